"""Shard preparation and the training loaders, on a generated set of videos.

1. Prepare throughput: videos/s of `safevid prepare` with 1 and 2 decoding processes (same
   inputs, same settings; the outputs are checked to be byte-identical).
2. Order: distinct videos and distinct shards per step of `--step-pairs` pairs, for the indexed
   loader (`data.loader=indexed`, the default) and the sequential stream (`data.loader=stream`,
   a shuffle buffer of `--shuffle-buffer` pairs), against a global permutation of all pairs.
3. Bytes read per rank over one epoch with 1, 2 and 4 ranks: the indexed loader's reads
   (members fetched, plus the member indexes), against dataset / world; the stream reads every
   shard whole on every rank.
4. Pairs/s on one core: the indexed loader (seek, read, JPEG decode) against decoding the same
   frames from the source mp4 at load time.
5. Resume start-up at 90% of an epoch against 0%.

The videos are small synthetic H.264 clips (PyAV), `--pairs-per-video` pairs each, sorted on
disk by category so that a path-ordered writer would give one-category shards.

    python benchmarks/bench_data.py                  # 2,000 videos
    python benchmarks/bench_data.py --videos 200     # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def _make_videos(root: Path, n: int, pairs_per_video: int) -> Path:
    from safevid.data_prep.synthetic import write_video

    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        category = f"cat{i * 8 // n}"
        name = f"{category}/clip_{i:05d}.mp4"
        frames = rng.integers(0, 255, (16, 48, 64, 3), dtype=np.uint8)
        write_video(frames, root / "videos" / name)
        for k in range(pairs_per_video):
            rows.append({"id": f"v{i}-{k}", "video": name, "category": category,
                         "prompt": f"Question {k} about clip {i}?", "chosen": "Safe.",
                         "rejected": "Unsafe."})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pairs


def _prepare(root: Path, pairs: Path, out: Path, workers: int) -> float:
    from safevid.data_prep.prepare import main as prepare_main

    t0 = time.perf_counter()
    rc = prepare_main(["--videos", str(root / "videos"), "--pairs", str(pairs), "--out", str(out),
                       "--frames", "8", "--size", "32", "--videos-per-shard", "64",
                       "--workers", str(workers), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"prepare failed ({rc})")
    return time.perf_counter() - t0


def _order_stats(steps: list[list], shard_of: dict) -> tuple[float, float]:
    videos = [len({v for v, _ in step}) for step in steps]
    shards = [len({shard_of[v] for v, _ in step}) for step in steps]
    return float(np.mean(videos)), float(np.mean(shards))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=2000)
    p.add_argument("--pairs-per-video", type=int, default=10)
    p.add_argument("--step-pairs", type=int, default=128)
    p.add_argument("--shuffle-buffer", type=int, default=512)
    p.add_argument("--keep", default=None, help="keep the generated data in this directory")
    args = p.parse_args()

    from safevid.data_prep.frames import read_frames
    from safevid.data_prep.shards import sidecar_path

    from safevid.data.indexed import IndexedStream
    from safevid.data.stream import PairStream, expand_shards

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_data."))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pairs = _make_videos(root, args.videos, args.pairs_per_video)
    print(f"generated {args.videos} videos, {args.videos * args.pairs_per_video} pairs in "
          f"{time.perf_counter() - t0:.0f} s ({root})")

    # 1. prepare throughput
    times = {}
    for workers in (1, 2):
        out = root / f"shards_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        times[workers] = _prepare(root, pairs, out, workers)
    same = all((root / "shards_w1" / f.name).read_bytes() == f.read_bytes()
               for f in (root / "shards_w2").glob("*.tar"))
    print("\n1. prepare throughput (8 frames, 32 px, JPEG 90)")
    print(f"{'workers':>8} {'seconds':>9} {'videos/s':>9}")
    for w, t in times.items():
        print(f"{w:>8} {t:>9.1f} {args.videos / t:>9.1f}")
    print(f"speed-up with 2 processes: {times[1] / times[2]:.2f}x; outputs identical: {same}")

    # 2. order: each loader's steps against a global permutation of all pairs
    shards = root / "shards_w1"
    urls = expand_shards(str(shards / "train-*.tar"))
    shard_of: dict[str, str] = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    shard_of[m.name.split(".")[0]] = url
    total = args.videos * args.pairs_per_video
    n_steps = total // args.step_pairs
    stream = PairStream(urls, seed=0, shuffle_buffer=args.shuffle_buffer)
    buffered = [[(p.video.key, p.id) for p in stream.take(args.step_pairs)] for _ in range(n_steps)]
    indexed_stream = IndexedStream([("train", urls, 1.0)], 0, args.step_pairs, 0)
    indexed = [[(p.video.key, p.id) for p in indexed_stream.step_pairs(0, 1)]
               for _ in range(n_steps)]
    everything = [pair for step in buffered for pair in step]
    random.Random(0).shuffle(everything)
    ideal = [everything[i * args.step_pairs:(i + 1) * args.step_pairs] for i in range(n_steps)]
    iv, is_ = _order_stats(ideal, shard_of)
    print(f"\n2. order, {args.step_pairs}-pair steps over one epoch ({n_steps} steps, "
          f"{len(urls)} shards)")
    print(f"{'':<30} {'videos/step':>12} {'shards/step':>12} {'of global':>18}")
    for name, steps in ((f"stream (buffer {args.shuffle_buffer})", buffered),
                        ("indexed (global order)", indexed), ("global permutation", ideal)):
        v, s_ = _order_stats(steps, shard_of)
        print(f"{name:<30} {v:>12.1f} {s_:>12.1f} {v / iv:>8.0%} / {s_ / is_:>6.0%}")
    print("target: >= 95% of the global permutation's videos and shards per step")

    # 3. bytes read per rank per epoch
    size = sum(Path(u).stat().st_size for u in urls)
    index_bytes = sum(sidecar_path(u).stat().st_size for u in urls if sidecar_path(u).is_file())
    print("\n3. bytes read per rank in one epoch (the stream reads every shard on every rank)")
    print(f"{'world':>6} {'stream MiB':>11} {'indexed MiB':>12} {'dataset/world':>14} "
          f"{'indexed/(dataset/world)':>24}")
    for world in (1, 2, 4):
        per_rank = []
        for rank in range(world):
            s = IndexedStream([("train", urls, 1.0)], 0, args.step_pairs, 0)
            read = 0
            real = s._read

            def counting(source, i, s=s, real=real):
                nonlocal read
                if (source, i) not in s._videos:
                    ref = s.order.sources[source].refs[i]
                    read += ref.json[1] + sum(n for _, n in ref.jpgs)
                return real(source, i)

            s._read = counting
            for _ in range(s.order.steps_per_epoch[0]):
                s.step_pairs(rank, world)
            per_rank.append(read + index_bytes)
        worst = max(per_rank)
        print(f"{world:>6} {size / 2**20:>11.1f} {worst / 2**20:>12.1f} "
              f"{size / world / 2**20:>14.1f} {worst / (size / world):>23.2f}x")
    print("target: <= 1.25 x dataset / world + index")

    # 4. loader pairs/s against decoding the source mp4 at load time (one core)
    sample = [json.loads(line) for line in pairs.read_text().splitlines()[:200]]
    s = IndexedStream([("train", urls, 1.0)], 1, 100, 0)
    t0 = time.perf_counter()
    n = 0
    for _ in range(2):
        for pair in s.step_pairs(0, 1):
            pair.video.decode_error()
            pair.video.release()
            n += 1
    shard_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for row in sample:
        read_frames(root / "videos" / row["video"], 8, 32)
    mp4_rate = len(sample) / (time.perf_counter() - t0)
    print("\n4. pairs/s on one core: indexed shards (seek, read, JPEG decode) vs decoding the mp4")
    print(f"shards {shard_rate:.0f}, mp4 {mp4_rate:.0f}, ratio {shard_rate / mp4_rate:.1f}x "
          "(target >= 3x)")

    # 5. resume start-up: the loader built and its first step read, at 0% and at 90% of an epoch
    def startup(step: int) -> float:
        t0 = time.perf_counter()
        s = IndexedStream([("train", urls, 1.0)], 0, args.step_pairs, 0, position=(step, 0))
        s.step_pairs(0, 1)
        return time.perf_counter() - t0

    epoch = IndexedStream([("train", urls, 1.0)], 0, args.step_pairs, 0).order.steps_per_epoch[0]
    t_0 = min(startup(0) for _ in range(3))
    t_90 = min(startup(int(0.9 * epoch)) for _ in range(3))
    t0 = time.perf_counter()
    PairStream(urls, 0, args.shuffle_buffer, position=(0, int(0.9 * total))).take(1)
    t_stream = time.perf_counter() - t0
    print("\n5. resume start-up (loader built, first step read)")
    print(f"indexed at 0%: {t_0:.3f} s, at 90%: {t_90:.3f} s, ratio {t_90 / t_0:.2f}x "
          f"(target <= 1.5x); the stream at 90%: {t_stream:.2f} s (it re-reads the epoch)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
