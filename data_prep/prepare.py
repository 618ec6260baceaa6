"""`safevid prepare`: videos + pairs -> WebDataset shards, index.json and rejects.jsonl.

Pairs are grouped by video; each video is decoded once (the shared frame sampler) and stored
once with all of its pairs. A pair's `split` field (default "train") picks its shard set, e.g.
`train-000000.tar`, `heldout-000000.tar`. Nothing is lost: every input pair is either written
or in rejects.jsonl with its source and reason, and index.json's totals say so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safevid.data_prep.frames import VideoError, read_frames
from safevid.data_prep.rejects import Rejects
from safevid.data_prep.shards import PAIR_FIELDS, REJECTS_FILE, ShardSet, write_index
from tqdm import tqdm

PAIR_KEEP = ("id", "prompt", "chosen", "rejected", "category", "query_type", "provenance")


def _video_path(videos_dir: Path, pair: dict) -> Path | None:
    if pair.get("video"):
        return videos_dir / pair["video"]
    if pair.get("video_id"):
        matches = sorted(videos_dir.glob(f"{pair['video_id']}.*"))
        return matches[0] if matches else videos_dir / f"{pair['video_id']}.mp4"
    return None


def read_pairs(path: Path, rejects: Rejects) -> list[dict]:
    """Pairs from a JSONL file; malformed lines are rejected with their line number."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{n}"
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.add(source, f"invalid JSON: {exc}")
            continue
        missing = [k for k in PAIR_FIELDS if not isinstance(pair.get(k), str) or not pair[k]]
        if missing or not (pair.get("video") or pair.get("video_id")):
            reason = f"missing fields: {missing or ['video or video_id']}"
            rejects.add(source, reason, id=pair.get("id"))
            continue
        pair["_source"] = source
        pairs.append(pair)
    return pairs


def prepare_shards(videos_dir: Path, pairs: list[dict], out_dir: Path, num_frames: int, size: int,
                   videos_per_shard: int = 64, workers: int = 2, rejects: Rejects | None = None,
                   progress: bool = True, crop: bool = True) -> dict:
    """Write the shards; `rejects` may already hold inputs rejected while reading the pairs."""
    rejects = Rejects(out_dir / REJECTS_FILE, fresh=True) if rejects is None else rejects
    inputs = len(pairs) + rejects.count
    by_video: dict[Path, list[dict]] = defaultdict(list)
    for pair in pairs:
        by_video[_video_path(videos_dir, pair)].append(pair)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, ShardSet] = {}

    def decode(path: Path):
        try:
            return path, read_frames(path, num_frames, size, crop), None
        except (VideoError, OSError) as exc:
            return path, None, str(exc)

    videos = sorted(by_video, key=str)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        # Decoding runs ahead in threads (decord releases the GIL); writing stays in order.
        for path, sampled, error in tqdm(pool.map(decode, videos), total=len(videos),
                                         desc="prepare", disable=not progress):
            group = by_video[path]
            if error is not None:
                for pair in group:
                    rejects.add(pair["_source"], f"video {path}: {error}", id=pair["id"])
                continue
            splits: dict[str, list[dict]] = defaultdict(list)
            for pair in group:
                splits[pair.get("split") or "train"].append({k: pair[k] for k in PAIR_KEEP if k in pair})
            for split, split_pairs in splits.items():
                if split not in sets:
                    sets[split] = ShardSet(out_dir, split, videos_per_shard)
                meta = {"source": str(path.relative_to(videos_dir)) if path.is_relative_to(videos_dir)
                        else str(path), "num_frames": num_frames}
                sets[split].add(path.stem, sampled, meta, split_pairs)
    frames = {"num_frames": num_frames, "size": size, "crop": crop, "format": "jpeg",
              "sampler": "uniform-centre"}
    index = write_index(out_dir, frames, {k: s.close() for k, s in sets.items()}, rejects.count, inputs)
    assert index["totals"]["pairs"] + index["totals"]["rejected"] == inputs, "pairs lost"
    return index


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="safevid prepare", description=__doc__.splitlines()[0])
    p.add_argument("--videos", required=True, type=Path, help="directory of video files")
    p.add_argument("--pairs", required=True, type=Path, help="pairs JSONL (video or video_id)")
    p.add_argument("--out", required=True, type=Path, help="output directory for shards")
    p.add_argument("--format", default="jpeg", choices=["jpeg"], help="frame encoding")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video")
    p.add_argument("--size", type=int, default=336, help="square frame size (crop)")
    p.add_argument("--keep-aspect", action="store_true",
                   help="shorter side to --size without the square crop (Qwen2-VL family: it "
                        "takes frames at their aspect ratio; LLaVA crops them on load)")
    p.add_argument("--videos-per-shard", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    args = p.parse_args(argv)
    for flag, path in (("--videos", args.videos), ("--pairs", args.pairs)):
        if not path.exists():
            print(f"safevid prepare: {flag}: not found: {path}", file=sys.stderr)
            return 2
    rejects = Rejects(args.out / REJECTS_FILE, fresh=True, prefix="safevid prepare")
    pairs = read_pairs(args.pairs, rejects)
    index = prepare_shards(args.videos, pairs, args.out, args.frames, args.size,
                           args.videos_per_shard, args.workers, rejects, crop=not args.keep_aspect)
    t = index["totals"]
    print(f"{'inputs':>10} {'pairs':>8} {'videos':>8} {'rejected':>9}")
    print(f"{t['inputs']:>10} {t['pairs']:>8} {t['videos']:>8} {t['rejected']:>9}")
    print(f"shards, index.json and {REJECTS_FILE} in {args.out}")
    return 0
