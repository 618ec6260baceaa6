"""Pairs -> model inputs: chat-template tokenization, length rules, then rows of sequences.

Three layouts, one code path. A row holds one or more *units* laid end to end; a unit is
- shared-prefix (`data.shared_prefix`): one per pair, [prompt | chosen | rejected]. Chosen and
  rejected each see the prompt and themselves, never each other, and the rejected answer's
  positions continue from the end of the prompt as if chosen were absent. The prompt (its video
  included) goes through the language model once per pair.
- packed (`data.packing`): one per answer, [prompt | answer], several per row;
- padded: the same units, one per row (the baseline).

Attention is described by two small per-token tensors instead of an [L, L] mask: `group` (the
unit a token belongs to, -1 on padding) and `branch` (0 for the prompt, 1 chosen, 2 rejected;
0 for every token of a packed or padded unit). A query attends to a key when they share a group,
the key is not later, and the key's branch is 0 or the query's own. `safevid.models.attention`
turns that into whatever the attention backend takes.

The log-prob targets are listed, not laid on the grid: answer token k of sequence s is predicted
by the hidden state at flat index `answer_src` (row * L + column). In shared-prefix units the
first rejected token is predicted by the last prompt token, which also predicts the first
chosen one. Sequence 2i is pair i's chosen answer, 2i+1 its rejected one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from safevid.data.stream import Pair
from safevid.models.family import VideoInput

IGNORE = -100


@dataclass
class VideoTokens:
    """How a model represents one video in the token stream."""

    token_id: int
    count: int  # placeholder tokens for this video


@dataclass
class Limits:
    """Length rules (`data.max_answer_tokens`, `data.max_length`, `data.max_prompt_length`)."""

    max_answer_tokens: int
    max_length: int  # prompt + one answer; 0: no limit beyond the answers' own
    max_prompt_length: int = 0  # 0: only what max_length leaves


@dataclass
class Layout:
    shared_prefix: bool
    packing: bool
    max_tokens_per_row: int

    @property
    def name(self) -> str:
        return "shared-prefix" if self.shared_prefix else "packed" if self.packing else "padded"


class PairTooLong(ValueError):
    """A pair that the length rules cannot fit; the message names the lengths and the keys."""


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L]
    positions: torch.Tensor  # [P, R, L] rotary positions (P = 1, or 3 for mrope)
    text_positions: torch.Tensor  # [R, L] place in its own sequence (0 at each start)
    group: torch.Tensor  # [R, L] unit id, -1 on padding
    branch: torch.Tensor  # [R, L] 0 prompt / whole sequence, 1 chosen, 2 rejected
    answer_src: torch.Tensor  # [N] flat index of the hidden state predicting each answer token
    answer_tgt: torch.Tensor  # [N] the answer token
    answer_seq: torch.Tensor  # [N] its sequence (2i chosen, 2i+1 rejected)
    pixels: torch.Tensor  # the micro-batch's distinct videos' pixels, concatenated on dim 0
    grid_thw: torch.Tensor | None  # [V, 3] (Qwen) or None
    frames: torch.Tensor  # [V] dim-0 size of each video's pixels
    video_of_slot: torch.Tensor  # video index of each placeholder run, in row-major order
    num_pairs: int
    tokens: int  # real (non-padding) tokens

    def to(self, device, dtype) -> MicroBatch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return MicroBatch(
            move(self.input_ids), move(self.positions), move(self.text_positions),
            move(self.group), move(self.branch), move(self.answer_src), move(self.answer_tgt),
            move(self.answer_seq), self.pixels.to(device, dtype, non_blocking=True),
            move(self.grid_thw), move(self.frames), move(self.video_of_slot), self.num_pairs,
            self.tokens,
        )

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def batch_inputs(batch: MicroBatch) -> dict:
    """The engine's forward arguments."""
    return {
        "input_ids": batch.input_ids, "positions": batch.positions,
        "text_positions": batch.text_positions, "group": batch.group, "branch": batch.branch,
        "answer_src": batch.answer_src, "answer_tgt": batch.answer_tgt,
        "answer_seq": batch.answer_seq, "pixels": batch.pixels, "grid_thw": batch.grid_thw,
        "frames": batch.frames, "video_of_slot": batch.video_of_slot,
        "num_seqs": 2 * batch.num_pairs,
    }


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


def answer_ids(tokenizer, text: str) -> list[int]:
    """An answer as the prompt's continuation, plus EOS. Answers are user text too: a `</s>`
    inside one is text, so the only EOS is the one added here."""
    return _text_ids(tokenizer, " " + text.strip()) + [tokenizer.eos_token_id]


def fit(pair_id: str, prompt: list[int], chosen: list[int], rejected: list[int],
        limits: Limits) -> EncodedPair:
    """Apply the length rules: answers are cut to what `max_answer_tokens` and `max_length`
    leave (a cut answer keeps no EOS: the model must not learn to stop where the text was only
    truncated); a prompt over `max_prompt_length`, or one that leaves no answer token, makes the
    pair unusable (`PairTooLong`, with the lengths)."""
    room = limits.max_answer_tokens
    if limits.max_length:
        room = min(room, limits.max_length - len(prompt))
    too_long_prompt = limits.max_prompt_length and len(prompt) > limits.max_prompt_length
    if too_long_prompt or room < 1:
        raise PairTooLong(
            f"too long: prompt {len(prompt)} tokens, chosen {len(chosen)}, rejected "
            f"{len(rejected)}; data.max_prompt_length={limits.max_prompt_length or 'off'}, "
            f"data.max_length={limits.max_length or 'off'}")
    return EncodedPair(prompt, chosen[:room], rejected[:room])


def encode_pair(pair: Pair, tokenizer, video: VideoTokens, limits: Limits) -> EncodedPair:
    """Prompt through the model's chat template; answers its continuation; length rules."""
    # One encoding at a time: a fast tokenizer's split-special-tokens switch is state shared by
    # every thread, and the prefetch thread encodes while evaluation encodes on the main one.
    with _TOKENIZER_LOCK:
        prompt = encode_prompt(pair.prompt, tokenizer, video)
        chosen, rejected = answer_ids(tokenizer, pair.chosen), answer_ids(tokenizer, pair.rejected)
    return fit(pair.id, prompt, chosen, rejected, limits)


def unit_lengths(encoded: list[EncodedPair], layout: Layout) -> list[int]:
    if layout.shared_prefix:
        return [len(e.prompt) + len(e.chosen) + len(e.rejected) for e in encoded]
    return [len(e.prompt) + len(a) for e in encoded for a in (e.chosen, e.rejected)]


def _rows(lengths: list[int], budget: int, packing: bool) -> list[list[int]]:
    """Unit ids per row: first-fit decreasing under `budget` when packing, else one per row.
    A unit is never longer than the budget (the length rules and the start-up check see to it);
    one that is still gets a row of its own rather than being cut."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = lengths[i]
        for r, u in enumerate(used):
            if u + n <= budget:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    # The rows are padded to the longest, so first-fit's full rows and one short last row waste
    # slots. With the same number of rows, each unit (longest first) to the least-filled row
    # evens them out; kept only when everything still fits the budget.
    balanced: list[list[int]] = [[] for _ in rows]
    load = [0] * len(rows)
    for i in order:
        r = min(range(len(rows)), key=load.__getitem__)
        balanced[r].append(i)
        load[r] += lengths[i]
    return balanced if max(load) <= budget and max(load) < max(used) else rows


def collate(encoded: list[EncodedPair], videos: list[VideoInput], video_of_pair: list[int],
            family, pad_id: int, layout: Layout) -> MicroBatch:
    """`encoded[i]` is pair i's tokens, `videos[video_of_pair[i]]` its video (each distinct
    video once: the vision tower runs once per video), `family` gives rotary positions."""
    units: list[tuple[int, int]] = []  # (pair, answer: 0 both / shared, 1 chosen, 2 rejected)
    for i in range(len(encoded)):
        units.extend([(i, 0)] if layout.shared_prefix else [(i, 1), (i, 2)])
    lengths = unit_lengths(encoded, layout)
    # Shared-prefix rows pack several pairs whenever packing is on.
    rows = _rows(lengths, layout.max_tokens_per_row, layout.packing)
    width = max(sum(lengths[u] for u in row) for row in rows)
    shape = (len(rows), width)
    P = family.position_rows
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros((P, *shape), dtype=torch.long)
    text_positions = torch.zeros(shape, dtype=torch.long)
    group = torch.full(shape, -1, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.long)
    src: list[torch.Tensor] = []
    tgt: list[list[int]] = []
    seq: list[torch.Tensor] = []
    video_of_slot: list[int] = []
    for r, row in enumerate(rows):
        col = 0
        for u in row:
            i, which = units[u]
            e, video = encoded[i], videos[video_of_pair[i]]
            p = len(e.prompt)
            answers = [(1, e.chosen), (2, e.rejected)] if which == 0 else \
                [(which, e.chosen if which == 1 else e.rejected)]
            # Each answer's positions as if its sequence were alone: the rejected answer of a
            # shared-prefix unit continues from the end of the prompt.
            prompt_pos = None
            start = col
            for b, ans in answers:
                pos = family.positions(e.prompt + ans, video)
                if prompt_pos is None:
                    prompt_pos = pos[:, :p]
                    input_ids[r, col:col + p] = torch.tensor(e.prompt)
                    positions[:, r, col:col + p] = prompt_pos
                    text_positions[r, col:col + p] = torch.arange(p)
                    col += p
                n = len(ans)
                input_ids[r, col:col + n] = torch.tensor(ans)
                positions[:, r, col:col + n] = pos[:, p:]
                text_positions[r, col:col + n] = torch.arange(p, p + n)
                if which == 0:
                    branch[r, col:col + n] = b
                # Answer token k is predicted by the token before it in its own sequence: the
                # last prompt token for k = 0, else the answer's own token k - 1.
                cols = torch.arange(col - 1, col + n - 1)
                cols[0] = start + p - 1
                src.append(r * width + cols)
                tgt.append(ans)
                seq.append(torch.full((n,), 2 * i + (b - 1), dtype=torch.long))
                col += n
            group[r, start:col] = u
            video_of_slot.append(video_of_pair[i])
    grids = [v.grid_thw for v in videos]
    return MicroBatch(
        input_ids, positions, text_positions, group, branch, torch.cat(src),
        torch.tensor([t for ans in tgt for t in ans], dtype=torch.long), torch.cat(seq),
        torch.cat([v.pixels for v in videos]),
        torch.stack(grids) if grids[0] is not None else None,
        torch.tensor([v.pixels.shape[0] for v in videos], dtype=torch.long),
        torch.tensor(video_of_slot, dtype=torch.long), len(encoded), int(sum(lengths)),
    )
