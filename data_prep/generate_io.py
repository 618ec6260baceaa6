"""Crash-safe, resumable JSONL outputs for the generation stages, job-array parts and merging.

Every input (a video, a caption) ends in exactly one of two places: its records in the output
file, or an input-level reject in the rejects file. Items dropped along the way (a pair that
failed verification) are written to the rejects file too, at item level, before the input's
records.

Why a kill at any moment loses and duplicates nothing:
- all lines of one input are written with one `write` and flushed, rejects before records;
- records of an input carry the size of their group (`provenance.caption_pairs` for pairs, 1
  otherwise), so a resume sees an input whose group is cut short and removes it;
- a last line without its newline is a torn write and is removed;
- item-level rejects of an input that is not complete are removed (they will be written again);
- input-level rejects marked `retryable` (the API was unavailable) are removed, so a rerun tries
  the input again; every LLM call already made for it is answered from the cache.
Repairs truncate the file when the damage is at the tail (the normal case after a kill) and
otherwise rewrite it atomically (temporary file + rename).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PART_RE = re.compile(r"\.part-(\d{5})-of-(\d{5})$")


# ---- keys, ids and job splitting ---------------------------------------------------------------
def stable_id(*parts: str, prefix: str = "", length: int = 20) -> str:
    """A deterministic id, so reruns and merges recognise the same item."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]
    return f"{prefix}{digest}"


def job_of(key: str, num_jobs: int) -> int:
    """The job that owns an input: a hash, so the split survives inputs being added."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % num_jobs


def job_from_env(job_index: int | None, num_jobs: int | None, out: Path) -> tuple[int, int]:
    """--job-index/--num-jobs, defaulting to a Slurm job array task's place (see
    `data_prep.jobs`). The array's shape is kept beside `out` (`<stem>.array.json`), so that a
    task run again alone (`sbatch --array=7`) redoes the same part."""
    from safevid.data_prep.jobs import Earlier, array_job

    from safevid.atomic import write_text_atomic

    record = out.with_name(f"{_stem(out)}.array.json")
    try:
        earlier = Earlier(*json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        earlier = None
    index, count, shape = array_job(job_index, num_jobs, earlier)
    if shape is None and count > 1 and earlier is None:
        shape = Earlier(count)  # a split by hand: a later lone Slurm task keeps its job count
    if shape is not None and shape.count > 1 and shape != earlier:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps([shape.count, shape.first, shape.step]))
    return index, count


def output_paths(out: Path, rejects: Path | None, index: int, count: int) -> tuple[Path, Path]:
    """This job's output and rejects files: the named ones, or per-job parts of them."""
    rejects = rejects or out.with_name(f"{_stem(out)}.rejects.jsonl")
    if count == 1:
        return out, rejects
    tag = f".part-{index:05d}-of-{count:05d}"
    return (out.with_name(f"{_stem(out)}{tag}.jsonl"),
            rejects.with_name(f"{_stem(rejects)}{tag}.jsonl"))


def _stem(path: Path) -> str:
    return path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name


# ---- records and their groups ------------------------------------------------------------------
def record_key(record: dict) -> str:
    """The input a record came from: its caption for pairs, itself for captions."""
    prov = record.get("provenance") or {}
    return str(prov["caption_id"]) if "caption_pairs" in prov else str(record["id"])


def record_group_size(record: dict) -> int:
    return int((record.get("provenance") or {}).get("caption_pairs", 1))


def make_reject(key: str, source: str, stage: str, reason: str, *, level: str = "input",
                retryable: bool = False, item: str = "", **detail: object) -> dict:
    """A rejects.jsonl line: which input (`key`, `source`), where it failed and why."""
    return {"id": stable_id(key, stage, item or "", level, prefix="rej-"), "key": key,
            "source": source, "stage": stage, "level": level, "reason": reason,
            "retryable": retryable, **({"item": item} if item else {}), **detail}


@dataclass
class Outcome:
    """What one input produced: records, dropped items, or an input-level reject."""

    key: str
    records: list[dict] = field(default_factory=list)
    drops: list[dict] = field(default_factory=list)
    reject: dict | None = None


# ---- reading and repairing JSONL ---------------------------------------------------------------
@dataclass
class _Line:
    start: int
    end: int
    value: dict | None  # None: not a JSON object


def _scan(path: Path) -> tuple[list[_Line], int]:
    """Complete lines with their byte spans, and the offset where a torn tail starts."""
    lines: list[_Line] = []
    if not path.exists():
        return lines, 0
    data = path.read_bytes()
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        raw = data[pos:end]
        if raw.strip():
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            lines.append(_Line(pos, end + 1, value if isinstance(value, dict) else None))
        pos = end + 1
    return lines, pos


def _repair(path: Path, lines: list[_Line], keep: list[bool], tail: int) -> int:
    """Drop unkept lines and a torn tail: truncate when they are all at the end, else rewrite."""
    size = path.stat().st_size if path.exists() else 0
    dropped = keep.count(False)
    if not dropped and tail == size:
        return 0
    first_bad = next((i for i, k in enumerate(keep) if not k), len(lines))
    if all(not k for k in keep[first_bad:]):
        cut = lines[first_bad].start if first_bad < len(lines) else tail
        with open(path, "r+b") as f:
            f.truncate(cut)
    else:
        data = path.read_bytes()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            for line, k in zip(lines, keep, strict=True):
                if k:
                    f.write(data[line.start:line.end])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped + (1 if tail < size else 0)


def read_records(path: Path) -> Iterable[tuple[int, dict | None, str]]:
    """(line number, object or None, raw text) for each non-empty line, torn tail included."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            yield number, value if isinstance(value, dict) else None, raw


# ---- one job's outputs ---------------------------------------------------------------------------
def select_records(lines: list[_Line]) -> tuple[list[bool], set[str]]:
    """Which record lines to keep (those of complete groups), and the complete inputs."""
    counts: Counter = Counter()
    sizes: dict[str, int] = {}
    keys: list[str | None] = []
    for line in lines:
        try:
            key = record_key(line.value) if line.value is not None else None
            if key is not None:
                sizes[key] = record_group_size(line.value)
                counts[key] += 1
        except (KeyError, TypeError, ValueError):
            key = None
        keys.append(key)
    complete = {k for k, n in counts.items() if n == sizes[k]}
    return [k is not None and k in complete for k in keys], complete


def select_rejects(lines: list[_Line], done: set[str]) -> tuple[list[bool], set[str]]:
    """Which reject lines to keep, and the inputs they finish (non-retryable input rejects).

    Retryable input rejects go (the input is tried again), and so do item drops of inputs that
    are not finished (they will be written again with their input).
    """
    final = {ln.value["key"] for ln in lines if ln.value and "key" in ln.value
             and ln.value.get("level") == "input" and not ln.value.get("retryable")}
    keep = []
    for line in lines:
        value = line.value
        if value is None or "key" not in value:
            keep.append(False)
        elif value.get("level") == "input":
            keep.append(not value.get("retryable"))
        else:
            keep.append(value["key"] in done or value["key"] in final)
    return keep, final


class JobOutput:
    """A job's output and rejects files, repaired on open; `done` holds the finished inputs."""

    def __init__(self, out: Path, rejects: Path) -> None:
        self.out_path, self.rejects_path = out, rejects
        out.parent.mkdir(parents=True, exist_ok=True)
        rejects.parent.mkdir(parents=True, exist_ok=True)
        self.resumed: Counter = Counter()  # what the files already held
        lines, tail = _scan(out)
        keep, written = select_records(lines)
        self.repaired = _repair(out, lines, keep, tail)  # lines removed on open
        self.resumed["records"] = keep.count(True)
        self.resumed["inputs written"] = len(written)
        lines, tail = _scan(rejects)
        keep, rejected = select_rejects(lines, written)
        self.repaired += _repair(rejects, lines, keep, tail)
        self.resumed["inputs rejected"] = len(rejected)
        self.resumed["items dropped"] = sum(
            1 for ln, k in zip(lines, keep, strict=True) if k and ln.value.get("level") == "item")
        self.done: set[str] = written | rejected
        self._out = open(out, "a", encoding="utf-8")
        self._rej = open(rejects, "a", encoding="utf-8")

    def commit(self, outcome: Outcome) -> None:
        """Write one input's outcome: rejects first, then its records, each in one write."""
        rejects = outcome.drops + ([outcome.reject] if outcome.reject else [])
        if rejects:
            self._rej.write("".join(_dumps(r) for r in rejects))
            self._rej.flush()
        if outcome.records:
            self._out.write("".join(_dumps(r) for r in outcome.records))
            self._out.flush()
        self.done.add(outcome.key)

    def close(self) -> None:
        self._out.close()
        self._rej.close()


def _dumps(record: dict) -> str:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    if not line.isascii():
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (read from a `\ud800` escape in an input file) has no UTF-8
            # form; JSON's ASCII escapes write the same value instead of ending the job.
            line = json.dumps(record) + "\n"
    return line


# ---- the loop ----------------------------------------------------------------------------------
async def run_pending(
    inputs: Iterable[tuple[str, object]],
    process: Callable[[str, object], Awaitable[Outcome]],
    output: JobOutput,
    window: int,
    on_done: Callable[[Outcome], None],
) -> None:
    """Process (key, item) inputs with at most `window` in flight, committing each as it ends.

    Results are committed in completion order (a slow input does not hold back the file);
    resume works on keys, not positions. An error stops the loop, cancels the inputs still in
    progress (nothing of theirs is written) and is raised.
    """
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task] = set()
    errors: list[BaseException] = []

    async def one(key: str, item: object) -> None:
        try:
            outcome = await process(key, item)
            output.commit(outcome)
            on_done(outcome)
        except Exception as exc:  # noqa: BLE001 - recorded before the slot frees, raised below
            errors.append(exc)
        finally:
            slots.release()

    try:
        for key, item in inputs:
            await slots.acquire()
            if errors:
                break
            task = asyncio.create_task(one(key, item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks and not errors:
            await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Unfinished inputs are simply not committed: a rerun does them (cache-served).
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    if errors:
        raise errors[0]


# ---- merging job parts -------------------------------------------------------------------------
def find_parts(out: Path) -> list[Path]:
    """`<stem>.part-XXXXX-of-NNNNN.jsonl` files beside `out`."""
    pattern = f"{_stem(out)}.part-*-of-*.jsonl"
    return sorted(p for p in out.parent.glob(pattern) if PART_RE.search(_stem(p)))


def missing_parts(parts: list[Path]) -> list[str]:
    """Part indices absent from a set of `.part-i-of-n` files (empty when complete)."""
    seen: dict[int, set[int]] = {}
    for part in parts:
        match = PART_RE.search(_stem(part))
        if match:
            seen.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    return [f"{i:05d}-of-{n:05d}" for n, have in seen.items() for i in range(n) if i not in have]


def rejects_part_for(part: Path) -> Path:
    """The rejects file that the job writing records part `part` wrote beside it by default."""
    stem = _stem(part)
    match = PART_RE.search(stem)
    base, tag = (stem[: match.start()], match.group(0)) if match else (stem, "")
    return part.with_name(f"{base}.rejects{tag}.jsonl")


def merge_parts(parts: list[Path], out: Path, rejects: Path) -> Counter:
    """Join job parts into `out` and `rejects`, keeping the first line with each id.

    Each part is read the way a resume would repair it, so a part whose job was killed adds only
    its finished inputs. Both files are written to temporaries and renamed into place.
    """
    stats: Counter = Counter()
    seen: set[str] = set()
    seen_rejects: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out, tmp_rej = out.with_name(out.name + ".tmp"), rejects.with_name(rejects.name + ".tmp")
    with open(tmp_out, "w", encoding="utf-8") as fo, open(tmp_rej, "w", encoding="utf-8") as fr:
        for part in parts:
            lines, tail = _scan(part)
            keep, written = select_records(lines)
            stats["lines left out (torn, bad or incomplete)"] += (
                keep.count(False) + int(tail < part.stat().st_size))
            for line, k in zip(lines, keep, strict=True):
                if not k or "id" not in line.value:
                    continue
                if line.value["id"] in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(line.value["id"])
                fo.write(_dumps(line.value))
                stats["records"] += 1
            rej_part = rejects_part_for(part)
            lines, _ = _scan(rej_part)
            keep, _ = select_rejects(lines, written)
            stats["inputs unfinished (retryable rejects)"] += sum(
                1 for ln in lines if ln.value and ln.value.get("retryable")
                and ln.value.get("level") == "input")
            for line, k in zip(lines, keep, strict=True):
                if k and line.value.get("id") not in seen_rejects:
                    seen_rejects.add(line.value.get("id"))
                    fr.write(_dumps(line.value))
                    stats["rejects"] += 1
        for f in (fo, fr):
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp_out, out)
    os.replace(tmp_rej, rejects)
    return stats


__all__ = [
    "JobOutput",
    "Outcome",
    "find_parts",
    "job_from_env",
    "job_of",
    "make_reject",
    "merge_parts",
    "missing_parts",
    "output_paths",
    "read_records",
    "record_key",
    "run_pending",
    "stable_id",
]
