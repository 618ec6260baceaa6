"""Answers from a local transformers directory of any supported family, prompted exactly as in
training.

Frames come from the project's one sampler (`read_frames`) and the family's own preprocessing;
the prompt is `encode_prompt` (chat template, BOS where the model has one, the video
placeholder expanded to one token per video feature), so the model sees at evaluation what it
saw in training. The shards store those frames as JPEG; evaluation
reads the video directly, which differs only by the JPEG rounding.

Resumable and reproducible: items are cut into fixed batches in bench order, and a batch that
holds any unanswered item is generated whole (answered items in it are generated again and
dropped). A resumed run therefore gives the exact answers of an uninterrupted one, padding and
sampling seeds included. An item whose frames do not decode is rejected once and recorded in
the same log (`video_error`), so a restart does not read it again.

Several processes (one per GPU, started by the training launcher) split the batches: process r
of W takes batches r, r+W, ... and appends to its own `answers.part-<r>.jsonl`. Since a batch's
answers do not depend on which process makes them, 1 and W processes give the same answers;
`merge_answer_logs` then writes one `answers.jsonl` in item order. A resume may use another W.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from safevid.eval.bench import BenchItem, Reject
from safevid.eval.records import AppendLog, read_records

DEFAULT_FRAMES = 8


@dataclass
class Answer:
    id: str
    answer: str
    n_tokens: int  # generated tokens, EOS excluded
    finished: bool  # ended with EOS (False: stopped at --max-new-tokens)
    empty: bool  # nothing but whitespace
    runaway: bool  # ran to the token limit repeating itself

    def record(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    generated: int = 0  # answers written by this run
    resumed: int = 0  # answers found from an earlier run
    rejected: list[Reject] = field(default_factory=list)  # items whose frames did not decode


def is_runaway(tokens: list[int], finished: bool, max_n: int = 8, cover: float = 0.5) -> bool:
    """An answer that hit the token limit and is mostly one n-gram repeated (n <= max_n).

    Coverage counts the positions inside any occurrence of the most frequent n-gram, so "a b a b
    a b" is covered fully by "a b"; an n-gram must occur at least 3 times.
    """
    if finished or len(tokens) < 6:
        return False
    for n in range(1, max_n + 1):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        gram, count = grams.most_common(1)[0]
        if count < 3:
            continue
        covered = [False] * len(tokens)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i:i + n]) == gram:
                covered[i:i + n] = [True] * n
        if sum(covered) >= cover * len(tokens):
            return True
    return False


def default_num_frames(model_dir: str | Path) -> tuple[int, str]:
    """Frames per video the model was trained with, and where that was read.

    A training run's `RUN_DIR/hf` has `RUN_DIR/config.yaml`, whose `data.shards` sit beside an
    `index.json` that records the frame count; the demo's initial model sits beside
    `shards/index.json`. Otherwise DEFAULT_FRAMES.
    """
    model_dir = Path(model_dir)
    candidates: list[Path] = []
    run_config = model_dir.parent / "config.yaml"
    if run_config.is_file():
        try:
            import yaml

            shards = str((yaml.safe_load(run_config.read_text()) or {})["data"]["shards"])
            first = shards.split(",")[0]
            candidates.append(Path(first).parent / "index.json")
        except (KeyError, TypeError, ValueError, OSError, ImportError):
            pass
    candidates.append(model_dir.parent / "shards" / "index.json")
    for index in candidates:
        try:
            return int(json.loads(index.read_text())["frames"]["num_frames"]), str(index)
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return DEFAULT_FRAMES, "default"


def device_and_dtype(device: str | None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The evaluation's device (default cuda when available) and dtype (`auto`: bf16 on a GPU
    that has it, else fp32: what training picks for `model.dtype=auto`)."""
    from safevid.engine import auto_dtype

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, auto_dtype(dev) if dtype == "auto" else getattr(torch, dtype)


class LocalModel:
    """A transformers directory of any supported family as a batched answer generator."""

    def __init__(self, model_dir: str | Path, num_frames: int, device: str | None = None,
                 dtype: str = "auto") -> None:
        from transformers import AutoModelForImageTextToText

        from safevid.models.dpo_model import load_family
        from safevid.models.family import load_tokenizer

        self.model_dir = Path(model_dir)
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.tokenizer = tok = load_tokenizer(str(self.model_dir))
        self.family = load_family(str(self.model_dir))
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_dir, dtype=self.dtype).to(self.device).eval()
        self.num_frames = num_frames
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    def prompt_ids(self, item: BenchItem, video) -> list[int]:
        """The training prompt: `encode_prompt` with this video's placeholder count."""
        from safevid.data.collate import VideoTokens, encode_prompt

        return encode_prompt(item.query, self.tokenizer,
                             VideoTokens(self.family.video_token_id, video.tokens))

    def pixels(self, video: Path):
        """The family's input for one video; raises VideoError when its frames do not decode."""
        from safevid.data_prep.frames import read_frames

        sampled = read_frames(video, self.num_frames, self.family.read_size)
        return self.family.prepare_video(sampled.frames, {"timestamps": sampled.timestamps})

    @torch.no_grad()
    def generate(self, items: list[BenchItem], pixels: list, max_new_tokens: int,
                 temperature: float = 0.0) -> list[Answer]:
        prompts = [self.prompt_ids(item, video) for item, video in zip(items, pixels, strict=True)]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        # Left padding: every row's last prompt token sits at the same column, where generation
        # continues; the attention mask hides the padding.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        video_inputs = self.family.generate_inputs(pixels, ids, self.device, self.dtype)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
            {"do_sample": False}
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, **video_inputs,
            max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(self.eos_ids),
            top_p=None, top_k=None, **sampling,
        )[:, width:].tolist()
        answers = []
        for item, row in zip(items, out, strict=True):
            stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            tokens = row if stop is None else row[:stop]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            answers.append(Answer(item.id, text, len(tokens), stop is not None, not text,
                                  is_runaway(tokens, stop is not None)))
        return answers


def _logs(path: Path) -> list[Path]:
    """The merged log and the per-process parts beside it (an interrupted multi-process run)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.part-*{path.suffix}"))]


def _all_records(path: Path) -> list[dict]:
    return [r for log in _logs(path) for r in read_records(log)]


def read_answers(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in _all_records(path) if "answer" in r}


def read_video_errors(path: Path) -> dict[str, dict]:
    """Items whose frames did not decode, recorded in the answers log so no rerun retries them."""
    return {r["id"]: r for r in _all_records(path) if "video_error" in r}


def merge_answer_logs(path: Path, items: list[BenchItem]) -> None:
    """One `path` in item order from it and its parts; written beside and renamed into place."""
    parts = _logs(path)[1:]
    if not parts:
        return
    answers, errors = read_answers(path), read_video_errors(path)
    records = [answers.get(item.id) or errors.get(item.id) for item in items]
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a merge cut off earlier
    with AppendLog(tmp) as log:
        for record in filter(None, records):
            log.append(record)
    tmp.replace(path)
    for part in parts:
        part.unlink()


def video_reject(item: BenchItem, reason: str) -> Reject:
    return Reject(f"{item.id} ({item.source})", reason, item.id, item.category)


def generate_answers(items: list[BenchItem], make_model: Callable[[], LocalModel], path: Path,
                     batch_size: int, max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0, progress: bool = True, rank: int = 0,
                     world: int = 1) -> GenerationStats:
    """Answer every item not yet in `path` (or its parts); the model is built only when there is
    work. With `world` > 1 this process takes every world-th batch and writes its own part."""
    from tqdm import tqdm

    from safevid.data_prep.frames import VideoError

    done = read_answers(path)
    errors = read_video_errors(path)
    stats = GenerationStats(resumed=sum(item.id in done for item in items))
    by_id = {item.id: item for item in items}
    for item_id, record in errors.items():
        if item_id in by_id and item_id not in done:
            stats.rejected.append(video_reject(by_id[item_id], record["video_error"]))
    done.update((i, r) for i, r in errors.items() if i not in done)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    todo = [(b, batch) for b, batch in enumerate(batches)
            if b % world == rank and any(item.id not in done for item in batch)]
    if not todo:
        return stats
    model = make_model()
    bar = tqdm(total=sum(item.id not in done for _, batch in todo for item in batch),
               desc="generate", unit="answer", disable=not progress, file=sys.stderr)
    log_path = path if world == 1 else path.with_name(f"{path.stem}.part-{rank}{path.suffix}")
    with AppendLog(log_path) as log:
        for b, batch in todo:
            usable, pixels = [], []
            if getattr(model, "items_independent", False):
                # A server answers each request alone: nothing to keep alike, so only the
                # unanswered items go out again.
                batch = [item for item in batch if item.id not in done]
            for item in batch:
                try:
                    pixels.append(model.pixels(item.video))
                    usable.append(item)
                except VideoError as exc:
                    if item.id not in done:
                        log.append({"id": item.id, "video_error": str(exc)})
                        stats.rejected.append(video_reject(item, str(exc)))
                        bar.update(1)
            if not usable:
                continue
            if temperature > 0:
                torch.manual_seed(seed * 1_000_003 + b)  # per batch: a resumed batch resamples alike
            for answer in model.generate(usable, pixels, max_new_tokens, temperature):
                if answer.id in done:
                    continue
                log.append(answer.record())
                stats.generated += 1
                bar.update(1)
    bar.close()
    return stats


__all__ = ["DEFAULT_FRAMES", "Answer", "GenerationStats", "LocalModel", "default_num_frames",
           "generate_answers", "is_runaway", "merge_answer_logs", "read_answers"]
