"""Pairs -> model inputs: chat-template tokenization, then rows of packed (or padded) sequences.

Packed and unpacked batches go through the same code: a row holds one or more sequences, each
with its own block of a 4D attention mask and positions restarting at 0. Unpacked is simply one
sequence per row. Sequence 2i is pair i's chosen answer, 2i+1 its rejected one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from safevid.data.stream import Pair
from safevid.models.preprocess import FrameSpec

IGNORE = -100


@dataclass
class VideoTokens:
    """How a model represents one video in the token stream."""

    token_id: int
    count: int  # placeholder tokens per video (frames x tokens per frame)


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, 1, L, L] bool, True = attend (float, 0 = attend, after .to)
    labels: torch.Tensor  # [R, L] next-token targets, IGNORE outside answers
    seq_index: torch.Tensor  # [R, L] sequence id of each position, -1 on padding
    pixel_values_videos: torch.Tensor  # [pairs, F, 3, S, S]
    video_of_slot: torch.Tensor  # pair index of each video placeholder run, in row-major order
    num_pairs: int
    tokens: int  # real (non-padding) tokens

    def to(self, device, dtype) -> MicroBatch:
        # The additive mask is made in the compute dtype: float32's min overflows to -inf in
        # half precision, and -inf rows turn attention into NaN.
        mask = torch.zeros(self.attention_mask.shape, dtype=dtype, device=device)
        mask.masked_fill_(~self.attention_mask.to(device), torch.finfo(dtype).min)
        return MicroBatch(
            self.input_ids.to(device), self.position_ids.to(device),
            mask, self.labels.to(device),
            self.seq_index.to(device), self.pixel_values_videos.to(device, dtype),
            self.video_of_slot.to(device), self.num_pairs, self.tokens,
        )


# Stands in for the user's text while the chat template is rendered, so that the text's place
# in the rendered prompt is known. Private-use characters: not whitespace (a template's `trim`
# keeps them), and no template or ordinary text contains them.
_USER_TEXT = "\ue000safevid-user-text\ue001"
_TOKENIZER_LOCK = threading.RLock()


def _text_ids(tokenizer, text: str) -> list[int]:
    """User text as plain text: a special-token string in it (`<video>`, `</s>`, `<|im_end|>`)
    is split into ordinary tokens, never read as the special token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def encode_prompt(prompt: str, tokenizer, video: VideoTokens) -> list[int]:
    """The prompt through the model's chat template, the video placeholder expanded.

    The whole rendered prompt is tokenized in one piece, as the model's own processor does,
    unless the user's text holds a special-token string: then the template's parts and the
    user's text are tokenized apart, the text with special tokens split, so that a `<video>`
    typed by a user is text and not a second video.
    """
    messages = [{"role": "user", "content": [{"type": "video"},
                                             {"type": "text", "text": _USER_TEXT}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, found, after = rendered.partition(_USER_TEXT)
    if not found:
        raise ValueError("the chat template did not keep the user's text where it can be found")
    # Tokens added as special outside the special-tokens map (as conversion scripts add
    # <video>/<image>) are matched as single tokens too.
    specials = {*tokenizer.all_special_tokens, *getattr(tokenizer, "added_tokens_encoder", {})}
    if any(tok in prompt for tok in specials):
        ids = (tokenizer(before, add_special_tokens=False)["input_ids"]
               + _text_ids(tokenizer, prompt) + tokenizer(after, add_special_tokens=False)["input_ids"])
    else:
        ids = tokenizer(before + prompt + after, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    # One placeholder in the template stands for the whole video's features.
    expanded: list[int] = []
    for t in ids:
        expanded.extend([t] * video.count if t == video.token_id else [t])
    if expanded.count(video.token_id) != video.count:
        raise ValueError("the chat template produced no single video placeholder")
    return expanded


def encode_pair(pair: Pair, tokenizer, video: VideoTokens, max_answer_tokens: int) -> EncodedPair:
    """Prompt through the model's chat template; answers are its continuation plus EOS.

    Answers are user text too: a `</s>` inside one is text, so the only EOS is the one added
    here, and the model is never trained to stop in mid-answer.
    """
    def answer(text: str) -> list[int]:
        ids = _text_ids(tokenizer, " " + text.strip())
        return ids[: max_answer_tokens - 1] + [tokenizer.eos_token_id]

    # One encoding at a time: a fast tokenizer's split-special-tokens switch is state shared by
    # every thread, and the prefetch thread encodes while evaluation encodes on the main one.
    with _TOKENIZER_LOCK:
        return EncodedPair(encode_prompt(pair.prompt, tokenizer, video), answer(pair.chosen),
                           answer(pair.rejected))


def _rows(lengths: list[int], budget: int, packing: bool) -> list[list[int]]:
    """Sequence ids per row: first-fit in order when packing, else one per row."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        for r, u in enumerate(used):
            if u + n <= budget:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def collate(pairs: list[Pair], encoded: list[EncodedPair], frames: FrameSpec, video: VideoTokens,
            pad_id: int, packing: bool, max_tokens_per_row: int) -> MicroBatch:
    seqs: list[tuple[list[int], int]] = []  # (tokens, index where the answer starts)
    for e in encoded:
        seqs.append((e.prompt + e.chosen, len(e.prompt)))
        seqs.append((e.prompt + e.rejected, len(e.prompt)))
    rows = _rows([len(s) for s, _ in seqs], max_tokens_per_row, packing)
    width = max(sum(len(seqs[i][0]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    video_of_slot: list[int] = []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            toks, start = seqs[i]
            n = len(toks)
            t = torch.tensor(toks)
            input_ids[r, col:col + n] = t
            position_ids[r, col:col + n] = torch.arange(n)
            seq_index[r, col:col + n] = i
            # position p predicts token p+1; only answer tokens are targets, and the last token
            # of a sequence predicts nothing (in a packed row the next token is another sequence).
            labels[r, col + start - 1:col + n - 1] = t[start:]
            video_of_slot.append(i // 2)
            col += n
    same = seq_index[:, :, None] == seq_index[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding positions attend to themselves only, so that no query row is fully masked.
    allowed = (same & causal & (seq_index >= 0)[:, :, None]) | torch.eye(width, dtype=torch.bool)
    pixels = torch.stack([frames(p.video.frames()) for p in pairs])
    return MicroBatch(
        input_ids, position_ids, allowed[:, None], labels, seq_index, pixels,
        torch.tensor(video_of_slot, dtype=torch.long), len(pairs), int((seq_index >= 0).sum()),
    )
