"""`safevid prepare`: videos + pairs -> WebDataset shards, index.json and rejects.jsonl.

Pairs are grouped by video; each video is decoded once (the shared frame sampler, in worker
processes) and stored once with all of its pairs. A pair's `split` field (default "train")
picks its shard set, e.g. `train-000000.tar`, `heldout-000000.tar`.

- Order: each split's videos are written in a seeded random order, so no shard holds one
  category or one source folder; the same inputs and settings give the same shards, byte for
  byte.
- Keys: `data_prep.keys.sample_key`, safe and unique whatever the file names; a pair's video
  path must stay inside the video directory.
- Job arrays: shard i belongs to job i % num_jobs. Each job writes its shards (each written
  beside and renamed into place, then recorded in `.parts/`), and a merge writes index.json and
  rejects.jsonl from the records. A rerun skips every shard already recorded, so a crashed job
  resumes and a half-written shard is never counted.
- Nothing is lost: every input pair is either written or in rejects.jsonl with its source and
  reason, and index.json's totals say so (inputs = pairs + rejected).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from safevid.data_prep.frames import VideoError, encode_jpeg, is_video_file, read_frames
from safevid.data_prep.jobs import Earlier, array_job
from safevid.data_prep.keys import UnsafePath, confine, sample_key
from safevid.data_prep.pairs_io import FORMATS, iter_pairs, parse_map
from safevid.data_prep.rejects import Rejects
from safevid.data_prep.shards import (
    INDEX_FILE,
    REJECTS_FILE,
    write_index,
    write_shard,
)
from tqdm import tqdm

from safevid.atomic import write_text_atomic

PAIR_KEEP = ("id", "prompt", "chosen", "rejected", "category", "query_type", "provenance")
PARTS = ".parts"


@dataclass(frozen=True)
class FrameSettings:
    num_frames: int  # frames per video (the maximum, with fps)
    size: int  # shorter side (and square crop unless keep_aspect)
    crop: bool = True
    fps: float | None = None  # sample at this rate instead of uniformly
    jpeg_quality: int = 90
    short_videos: str = "pad"  # fewer decodable frames than asked: "pad" (repeat) or "reject"
    max_pixels: int | None = None  # with crop off: the most pixels a frame keeps


def _video_relpath(videos_dir: Path, pair: dict) -> str:
    """The pair's video, relative to `videos_dir` ('/'-separated); raises UnsafePath."""
    if pair.get("video"):
        confine(videos_dir, pair["video"])
        # One spelling per file: `./a.mp4` and `a.mp4` are one video (one sample, one key).
        return PurePosixPath(pair["video"].replace("\\", "/")).as_posix()
    name = str(pair["video_id"])
    confine(videos_dir, name)
    # The id is a name, not a pattern: `clip [hd]` must not match other files. Only a video
    # named exactly so counts: not `clip.en.vtt` or `clip.info.json` beside it, nor
    # `clip.v2.mp4` (another video).
    stem = Path(name).name
    matches = sorted(p for p in videos_dir.glob(f"{glob.escape(name)}.*")
                     if p.stem == stem and is_video_file(p) and p.is_file())
    if len(matches) > 1:
        raise UnsafePath(f"video_id {name!r} names {len(matches)} videos ("
                         f"{', '.join(p.name for p in matches)}); give the file in `video`")
    return matches[0].relative_to(videos_dir).as_posix() if matches else f"{name}.mp4"


def _quiet_worker() -> None:
    """Worker processes: ffmpeg's own log lines (written by C code to fd 2) stay off the
    terminal; failures still reach the parent as exceptions with their messages."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


class _Decoders:
    """The decoding processes. A video that kills its process (a crash inside the decoder, a
    kill for memory) breaks the whole pool, and every video in flight fails with it. The pool
    is started afresh for what comes next; each video that was in flight is decoded again in
    one separate process, one at a time, so only the one that kills it is rejected (and that
    process alone is restarted). The job goes on; a rerun does not meet the crash again (the
    video's rejection is in its shard's record)."""

    def __init__(self, workers: int, context, settings: FrameSettings):
        self.workers, self.context, self.settings = workers, context, settings
        self.pool = self._start(workers)
        self.retry = None  # the one-process pool for videos that were in flight at a crash

    def _start(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(workers, mp_context=self.context, initializer=_quiet_worker)

    def _restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._start(self.workers)

    def submit(self, path: str):
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = self.pool.submit(decode_video, path, self.settings)
        except BrokenProcessPool:
            self._restart()
            future = self.pool.submit(decode_video, path, self.settings)
        future.pool = self.pool  # which pool to restart if this one breaks
        return future

    def result(self, future, path: str) -> tuple[dict | None, list[bytes] | None, str | None]:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            if future.pool is self.pool:  # the first of its videos to find it broken
                self._restart()
        self.retry = self.retry or self._start(1)
        try:
            return self.retry.submit(decode_video, path, self.settings).result()
        except BrokenProcessPool:
            self.retry.shutdown(wait=False, cancel_futures=True)
            self.retry = None
            return None, None, ("the decoding process died on this video (a crash inside the "
                                "decoder, or killed for memory)")

    def shutdown(self, wait: bool = True) -> None:
        for pool in (self.pool, self.retry):
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=not wait)


def decode_video(path: str, settings: FrameSettings) -> tuple[dict | None, list[bytes] | None, str | None]:
    """(record, JPEG frames, None) or (None, None, reason); runs in a worker process."""
    # Fault injection for the test suite: a decoder that crashes on one file (no real file
    # crashes the decoders here on purpose). Unset in normal runs.
    crash = os.environ.get("SAFEVID_TEST_DECODER_CRASH")
    if crash and path.endswith(crash):
        os._exit(139)
    if not Path(path).is_file():
        return None, None, "not found"
    if Path(path).stat().st_size == 0:
        return None, None, "empty file (0 bytes)"
    try:
        sampled = read_frames(path, settings.num_frames, settings.size, settings.crop, settings.fps,
                              settings.max_pixels)
    except (VideoError, OSError) as exc:
        return None, None, str(exc)
    distinct = len(set(sampled.indices))
    if settings.short_videos == "reject" and distinct < len(sampled.indices):
        return None, None, (f"only {sampled.total_frames} decodable frames, {len(sampled.indices)} "
                            "asked (--short-videos reject)")
    record = {"fps": sampled.fps, "total_frames": sampled.total_frames,
              "frame_indices": sampled.indices, "timestamps": sampled.timestamps}
    return record, [encode_jpeg(f, settings.jpeg_quality) for f in sampled.frames], None


def read_video_list(path: Path) -> tuple[Path, set[str]]:
    """`--videos LIST`: a text file of video paths, one a line, relative to the file's own
    directory (which confines them). A line starting with '#' is a comment, and so is a
    trailing ` # ...` unless the whole line names a file. The directory and the listed paths."""
    listed = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # A trailing ` # comment`, unless the whole line names a file (`Episode #12.mp4`).
        if not (path.parent / line).is_file():
            line = re.split(r"\s#", line, maxsplit=1)[0].strip()
        listed.add(PurePosixPath(line.replace("\\", "/")).as_posix())
    return path.parent, listed


def plan_shards(videos_dir: Path, pairs: list[dict], rejects: Rejects, videos_per_shard: int,
                seed: int, listed: set[str] | None = None
                ) -> dict[str, list[list[tuple[str, list[dict]]]]]:
    """split -> shards -> (video relpath, its pairs), in the seeded order. Pairs whose video
    path is unsafe (or, with a video list, not listed) are rejected here."""
    by_split: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for pair in pairs:
        try:
            rel = _video_relpath(videos_dir, pair)
        except UnsafePath as exc:
            rejects.add(pair["_source"], str(exc), id=pair.get("id"))
            continue
        if listed is not None and rel not in listed:
            rejects.add(pair["_source"], f"video {rel}: not in the --videos list", id=pair.get("id"))
            continue
        by_split[pair.get("split") or "train"][rel].append(pair)
    plan = {}
    for split, videos in sorted(by_split.items()):
        order = sorted(videos)
        random.Random(f"{seed}/{split}").shuffle(order)
        items = [(rel, videos[rel]) for rel in order]
        plan[split] = [items[i:i + videos_per_shard] for i in range(0, len(items), videos_per_shard)]
    return plan


def _fingerprint(base: str, videos_dir: Path, shard: list[tuple[str, list[dict]]]) -> str:
    """Settings, and the shard's videos (path, size, modification time) with every field of
    their pairs that goes into it: equal only for the same shard. A rerun after a fix to a
    pair's text or a re-encoded video writes that shard again, never keeps the old one."""
    def stamp(rel: str) -> list[int] | None:
        try:
            st = (videos_dir / rel).stat()
        except OSError:
            return None  # not there: the decode rejects it, and a later copy changes this
        return [st.st_size, st.st_mtime_ns]

    content = json.dumps([base, [(rel, stamp(rel), [{k: p[k] for k in PAIR_KEEP if k in p}
                                                    for p in group]) for rel, group in shard]],
                         default=str)
    return hashlib.sha1(content.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _recorded(path: Path) -> str | None:
    """The fingerprint of a shard's record, or None when there is none."""
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def _shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def prepare_shards(videos_dir: Path, pairs: list[dict], out_dir: Path, num_frames: int, size: int,
                   videos_per_shard: int = 64, workers: int = 2, rejects: Rejects | None = None,
                   progress: bool = True, crop: bool = True, *, seed: int = 0,
                   job_index: int = 0, num_jobs: int = 1, fps: float | None = None,
                   jpeg_quality: int = 90, short_videos: str = "pad",
                   max_pixels: int | None = None, listed: set[str] | None = None,
                   array: Earlier | None = None) -> dict | None:
    """Write this job's shards; with one job (or when `merge`), also index.json. `rejects` may
    already hold inputs rejected while reading the pairs. Returns the index, or None for a job
    of an array (run `merge_parts` once all have finished)."""
    import multiprocessing

    settings = FrameSettings(num_frames, size, crop, fps, jpeg_quality, short_videos, max_pixels)
    read_rejects = rejects or Rejects(None, keep=True)
    plan_rejects = Rejects(None, keep=True, prefix=read_rejects.prefix)
    plan = plan_shards(videos_dir, pairs, plan_rejects, videos_per_shard, seed, listed)
    parts = out_dir / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    # What each shard must hold: its settings and its videos. A shard recorded with another
    # fingerprint (a rerun with other settings or inputs) is written again, never kept.
    base = json.dumps([asdict(settings), seed, videos_per_shard])
    prints = {split: [_fingerprint(base, videos_dir, shard) for shard in shards]
              for split, shards in plan.items()}
    job = {"settings": asdict(settings), "seed": seed, "videos_per_shard": videos_per_shard,
           "plan": {split: len(shards) for split, shards in plan.items()}, "fingerprints": prints,
           "num_jobs": num_jobs, "inputs": len(pairs) + read_rejects.count,
           # The Slurm array's task numbering, for a task run again alone (data_prep.jobs);
           # null for a split given by hand.
           "array": [array.count, array.first, array.step] if array else None,
           "rejects": read_rejects.records + plan_rejects.records}
    write_text_atomic(parts / f"job-{job_index}-of-{num_jobs}.json", json.dumps(job))
    mine = [(split, i, shard) for split, shards in plan.items() for i, shard in enumerate(shards)
            if i % num_jobs == job_index
            and _recorded(parts / f"{_shard_name(split, i)}.json") != prints[split][i]]
    total = sum(len(shard) for _, _, shard in mine)
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
    decoders = _Decoders(max(1, workers), context, settings)
    done = False
    try:
        with tqdm(total=total, desc="prepare", unit="video", disable=not progress) as bar:
            # Two shards in flight at most: decoded frames wait in memory only that long.
            pending: list = []

            def submit(k: int) -> None:
                if k < len(mine):
                    pending.append([decoders.submit(str(videos_dir / rel)) for rel, _ in mine[k][2]])

            submit(0)
            submit(1)
            for position, (split, i, shard) in enumerate(mine):
                futures = pending.pop(0)
                submit(position + 2)
                samples, n_pairs = [], 0
                shard_rejects = Rejects(None, keep=True, prefix=read_rejects.prefix)
                for (rel, group), future in zip(shard, futures, strict=True):
                    record, jpegs, error = decoders.result(future, str(videos_dir / rel))
                    bar.update(1)
                    if error is not None:
                        for p in group:
                            shard_rejects.add(p["_source"], f"video {rel}: {error}", id=p.get("id"))
                        continue
                    kept = [{k: p[k] for k in PAIR_KEEP if k in p} for p in group]
                    doc = {"source": rel, "num_frames": len(jpegs), **record,
                           "id": sample_key(rel), "pairs": kept}
                    samples.append((sample_key(rel), doc, jpegs))
                    n_pairs += len(kept)
                name = _shard_name(split, i)
                if samples:
                    write_shard(out_dir / name, samples)
                # The record comes after the shard: a shard is counted only once it is whole.
                write_text_atomic(parts / f"{name}.json", json.dumps(
                    {"file": name if samples else None, "videos": len(samples), "pairs": n_pairs,
                     "fingerprint": prints[split][i], "rejects": shard_rejects.records}))
        done = True
    finally:
        # On an error, the queued decodes are cancelled rather than waited for.
        decoders.shutdown(wait=done)
    return merge_parts(out_dir) if num_jobs == 1 else None


def merge_parts(out_dir: Path) -> dict:
    """index.json and rejects.jsonl from every job's records; refuses while a shard is
    missing (naming the job to rerun)."""
    parts = out_dir / PARTS
    jobs = sorted(parts.glob("job-*-of-*.json"))
    if not jobs:
        raise SystemExit(f"safevid prepare --merge: no job records in {parts}")
    records = [json.loads(j.read_text()) for j in jobs]
    job = records[0]
    num_jobs = job.get("num_jobs", 1)
    keys = ("settings", "seed", "videos_per_shard", "plan", "fingerprints", "num_jobs")
    if any(any(r.get(k) != job.get(k) for k in keys) for r in records[1:]):
        raise SystemExit(f"safevid prepare --merge: the job records in {parts} disagree (runs with "
                         "other settings, inputs or job counts): rerun every job with the same "
                         "arguments, or prepare into a new --out")
    splits: dict[str, list[dict]] = {}
    rejects = list(job["rejects"])
    missing = []
    for split, n in job["plan"].items():
        splits[split] = []
        for i in range(n):
            record_path = parts / f"{_shard_name(split, i)}.json"
            if _recorded(record_path) != job["fingerprints"][split][i]:
                missing.append(f"{_shard_name(split, i)} (job {i % num_jobs})")
                continue
            record = json.loads(record_path.read_text())
            rejects += record["rejects"]
            if record["file"]:
                splits[split].append({k: record[k] for k in ("file", "videos", "pairs")})
    if missing:
        raise SystemExit(f"safevid prepare --merge: shards not written yet: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}; rerun those jobs")
    write_text_atomic(out_dir / REJECTS_FILE, "".join(
        json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rejects))
    s = job["settings"]
    frames = {"num_frames": s["num_frames"], "size": s["size"], "crop": s["crop"],
              "max_pixels": s.get("max_pixels"),
              "fps": s["fps"], "jpeg_quality": s["jpeg_quality"], "format": "jpeg",
              "sampler": "fps" if s["fps"] else "uniform-centre", "seed": job["seed"]}
    index = write_index(out_dir, frames, {k: v for k, v in splits.items() if v}, len(rejects),
                        job["inputs"])
    if index["totals"]["pairs"] + index["totals"]["rejected"] != job["inputs"]:
        raise SystemExit(f"safevid prepare --merge: {job['inputs']} inputs but "
                         f"{index['totals']['pairs']} pairs written and {index['totals']['rejected']} "
                         "rejected: the shard records do not belong to one run")
    return index


def earlier_array(out_dir: Path) -> Earlier | None:
    """The job array an earlier run into `out_dir` was split into (from its job records), so
    that a task run again alone does the same shards: the Slurm array's recorded shape, else
    (a split given by hand) its job count from 0; None without records. ValueError when the
    records disagree (the merge would refuse them too)."""
    counts, shapes = set(), set()
    for path in (out_dir / PARTS).glob("job-*-of-*.json"):
        try:
            job = json.loads(path.read_text())
            counts.add(int(job["num_jobs"]))
            if job.get("array"):
                shapes.add(Earlier(*job["array"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not counts:
        return None
    if len(counts) > 1 or len(shapes) > 1 or (shapes and shapes.copy().pop().count not in counts):
        raise ValueError(f"the job records in {out_dir / PARTS} disagree on the job array "
                         f"({sorted(counts)} jobs): set --job-index and --num-jobs, or prepare "
                         "into a new --out")
    return shapes.pop() if shapes else Earlier(counts.pop())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="safevid prepare", description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=Path,
                   help="directory of videos, or a text file listing them (paths relative to it)")
    p.add_argument("--pairs", type=Path,
                   help="pairs: .jsonl, .json, .parquet, or a `datasets` directory (read as a stream)")
    p.add_argument("--format", choices=FORMATS, default="safevid",
                   help="the pairs' schema (see data_prep/pairs_io.py and docs/data_preparation.md)")
    p.add_argument("--map", action="append", default=[], metavar="SRC=DST",
                   help="read field SRC as our DST (id, video, video_id, prompt, chosen, rejected, "
                        "category, ...); repeatable, applied over --format's mapping")
    p.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    p.add_argument("--frames", type=int, default=16, help="frames per video (the most, with --fps)")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate, up to --frames")
    p.add_argument("--size", type=int, default=336, help="frame size: square crop, or shorter side")
    p.add_argument("--keep-aspect", action="store_true",
                   help="shorter side to --size without the square crop (Qwen2-VL family: it "
                        "takes frames at their aspect ratio; LLaVA crops them on load)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="with --keep-aspect: the most pixels a frame keeps (a pixel budget for "
                        "very wide videos)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--short-videos", choices=("pad", "reject"), default="pad",
                   help="a video with fewer frames than asked: repeat frames, or reject it")
    p.add_argument("--videos-per-shard", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--seed", type=int, default=0, help="the order videos are written in")
    p.add_argument("--job-index", type=int, default=None,
                   help="this job's index in an array (default: the Slurm array task's place "
                        "in its array, else 0)")
    p.add_argument("--num-jobs", type=int, default=None,
                   help="jobs in the array (default: the Slurm array's task count, else 1)")
    p.add_argument("--merge", action="store_true",
                   help="only write index.json and rejects.jsonl from the jobs' records")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.merge:
        index = merge_parts(args.out)
    else:
        for flag, path in (("--videos", args.videos), ("--pairs", args.pairs)):
            if path is None or not path.exists():
                print(f"safevid prepare: {flag}: not found: {path}", file=sys.stderr)
                return 2
        try:
            earlier = None
            if os.environ.get("SLURM_ARRAY_TASK_ID") and None in (args.job_index, args.num_jobs):
                earlier = earlier_array(args.out)
            args.job_index, args.num_jobs, shape = array_job(args.job_index, args.num_jobs, earlier)
        except ValueError as exc:
            print(f"safevid prepare: {exc}", file=sys.stderr)
            return 2
        videos_dir, listed = args.videos, None
        if args.videos.is_file():
            videos_dir, listed = read_video_list(args.videos)
        rejects = Rejects(None, keep=True, prefix="safevid prepare")
        try:
            mapping = parse_map(args.map)
            pairs = list(iter_pairs(args.pairs, rejects, args.format, mapping))
        except ValueError as exc:
            print(f"safevid prepare: {exc}", file=sys.stderr)
            return 2
        index = prepare_shards(
            videos_dir, pairs, args.out, args.frames, args.size, args.videos_per_shard,
            args.workers, rejects, not args.no_progress, crop=not args.keep_aspect,
            seed=args.seed, job_index=args.job_index, num_jobs=args.num_jobs, fps=args.fps,
            jpeg_quality=args.jpeg_quality, short_videos=args.short_videos,
            max_pixels=args.max_pixels, listed=listed, array=shape)
        if index is None:
            print(f"safevid prepare: job {args.job_index} of {args.num_jobs} done; once all are, "
                  f"run: safevid prepare --merge --out {args.out}")
            return 0
    t = index["totals"]
    print(f"{'inputs':>10} {'pairs':>8} {'videos':>8} {'rejected':>9}")
    print(f"{t['inputs']:>10} {t['pairs']:>8} {t['videos']:>8} {t['rejected']:>9}")
    print(f"index: {args.out / INDEX_FILE}; rejects: {args.out / REJECTS_FILE}")
    return 0
