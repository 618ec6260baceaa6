"""The body of `safevid precompute-ref` (see safevid/reference.py): the reference model once
over every training and evaluation shard, the shards split over ranks by pair count."""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def precompute(cfg) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from safevid import distributed
    from safevid import engine as setup_mod
    from safevid.config import ConfigError
    from safevid.data.collate import batch_inputs
    from safevid.data.indexed import load_index, shard_pairs
    from safevid.data.stream import Pair, Video
    from safevid.data_prep.rejects import Rejects, merge_rank_files, rank_file
    from safevid.demo_assets import ensure_demo_assets
    from safevid.dpo import Batcher, micro_batches
    from safevid.losses import needs_reference
    from safevid.models.dpo_model import LoadedModel
    from safevid.models.family import load_tokenizer
    from safevid.reference import (
        RefLogpsError,
        RefTable,
        distinct_shards,
        ref_file,
        shard_digest,
        split_shards,
        text_digest,
        write_shard_file,
    )
    from safevid.train import data_sets

    if not needs_reference(cfg.loss.type):
        raise ConfigError(f"key 'loss.type': {cfg.loss.type} uses no reference model; there is "
                          "nothing to precompute")
    if cfg.demo.build:
        ensure_demo_assets(Path(cfg.demo.assets_dir), seed=cfg.demo.seed)
    _, train_urls, eval_urls = data_sets(cfg)
    urls = distinct_shards(train_urls + eval_urls)
    rank, world, _ = distributed.init(cfg.train.collective_timeout_s)
    setup = setup_mod.prepare(cfg, 1, world)
    m = cfg.train.micro_batch_pairs
    out = Path(cfg.output_dir)
    layout = Batcher.layout_of(cfg.data).name
    # A rejects file per rank (one file appended to from several nodes can lose lines), merged
    # by rank 0 at the end.
    rejects_path = out / "rejects_precompute.jsonl"
    dtype_name = str(setup.dtype).removeprefix("torch.")

    def plan() -> tuple[dict, dict[int, int], dict[int, str], list[list[int]]]:
        """Rank 0 decides for all: the fingerprint, which shards still need their file (a
        complete, current file is kept: a rerun after a failure does only the rest), their
        pair counts and digests as read now, and which rank does each. Every place a file
        goes is tried first: a read-only data directory is a refusal here, not a failed write
        on one rank in the middle of the forwards."""
        out.mkdir(parents=True, exist_ok=True)
        fp = setup_mod.ref_fingerprint(cfg, setup)
        todo = []
        for i, url in enumerate(urls):
            try:
                RefTable.load([url], fp, cfg.train.ref_logps_dir)
            except RefLogpsError:
                todo.append(i)
        for where in {ref_file(urls[i], cfg.train.ref_logps_dir).parent for i in todo}:
            try:
                where.mkdir(parents=True, exist_ok=True)
                probe = where / f".safevid-write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise ConfigError(f"cannot write reference log-probs into {where} ({exc}); "
                                  "name a writable directory in train.ref_logps_dir") from exc
        refs = {i: load_index([urls[i]]) for i in todo}
        counts = {i: sum(r.pairs for r in refs[i]) for i in todo}
        digests = {i: shard_digest(urls[i], refs[i]) for i in todo}
        parts = [[todo[j] for j in part] for part in split_shards([counts[i] for i in todo], world)]
        return fp, counts, digests, parts

    fp, counts, digests, parts = distributed.from_first_rank(plan, rank)
    mine = parts[rank]
    # Every rank runs the same number of forwards (ZeRO-3 gathers parameters for each): the
    # ranks with fewer pairs finish with stand-in micro-batches of weight 0.
    steps = max(math.ceil(sum(counts[i] for i in part) / m) for part in parts)
    if not any(parts):  # the same answer on every rank: it came from rank 0
        if rank == 0:
            merge_rank_files(rejects_path)  # what a killed run left
            print(f"safevid: the reference log-probs of all {len(urls)} shards are current; "
                  "nothing to do", file=sys.stderr)
        return 0
    reference, loaded = setup_mod.build_reference(cfg, setup)
    # Pairs are encoded with the policy's tokenizer and frame settings, as in training.
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    batcher = Batcher(LoadedModel(loaded.model, tokenizer, setup.family), cfg.data)
    if rank == 0:
        print(f"safevid: precomputing reference log-probs of {sum(counts.values())} pairs in "
              f"{sum(map(len, parts))} of {len(urls)} shards ({len(urls) - sum(map(len, parts))} "
              f"already done) on {world} ranks; reference "
              f"{cfg.model.ref_name_or_path or cfg.model.name_or_path}, layout {layout}, "
              f"attention {setup.backend}, {dtype_name}", file=sys.stderr)
    rejects = Rejects(rank_file(rejects_path, rank), tags={"rank": rank})

    def slots():
        for i in mine:
            for pair in shard_pairs(urls[i], rejects):
                yield i, pair
        pad = Video("padding", {}, [b""], error="padding")
        while True:
            yield None, Pair("padding", ".", ".", ".", pad, valid=False)

    decoder = ThreadPoolExecutor(max(1, cfg.data.decode_threads))

    def build(chunk: list) -> tuple[list, object]:
        return chunk, micro_batches([p for _, p in chunk], batcher, m, rejects, decoder)[0]

    results: dict[int, dict[str, list]] = {i: {} for i in mine}
    left = {i: counts[i] for i in mine}
    failed: list[str] = []

    def write(shard: int) -> None:
        # A failed write (a full disk, a path in the way) must not end this rank alone while
        # the others wait in the next forward's gather: it is kept, every rank hears of it
        # after the last forward, and a rerun redoes just the shards without a file.
        path = ref_file(urls[shard], cfg.train.ref_logps_dir)
        try:
            write_shard_file(path, fp, urls[shard], digests[shard], results.pop(shard))
        except OSError as exc:
            failed.append(f"{urls[shard]}: cannot write {path}: {exc}")

    it = slots()
    pool = ThreadPoolExecutor(1)  # the next micro-batch is built while this one runs
    bar = tqdm(total=steps, disable=rank != 0, desc="reference", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        pending = pool.submit(build, [next(it) for _ in range(m)])
        with torch.no_grad():
            for step in range(steps):
                chunk, batch = pending.result()
                if step + 1 < steps:
                    pending = pool.submit(build, [next(it) for _ in range(m)])
                logps, _ = reference(**batch_inputs(batch.to(setup.device, setup.dtype)))
                values = logps.double().cpu().tolist()
                for j, (shard, pair) in enumerate(chunk):
                    # None: a stand-in; not in results: a shard that grew since it was planned
                    # (its file is written, stamped with the digest it had, so it reads as
                    # stale).
                    if shard is None or shard not in results:
                        continue
                    entries = results[shard].setdefault(pair.video.key, [])
                    entries.extend([None] * (pair.index + 1 - len(entries)))
                    entries[pair.index] = ([pair.id, values[2 * j], values[2 * j + 1],
                                            text_digest(pair)] if pair.valid else None)
                    left[shard] -= 1
                    if left[shard] == 0:  # the shard is whole: its file, written then renamed
                        write(shard)
                bar.update(1)
    finally:
        # On an error too: the build thread and the decoding pool end with this rank.
        pool.shutdown(cancel_futures=True)
        decoder.shutdown(cancel_futures=True)
        bar.close()
    # Shards with no pairs at all (every sample unreadable) still get their file.
    for shard in list(results):
        write(shard)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, failed)  # also the barrier: every file is written
    failed = [line for part in everyone for line in part]
    rejected = merge_rank_files(rejects_path) if rank == 0 else 0
    if failed:
        if rank == 0:
            print(f"safevid: the reference log-probs of {len(failed)} shards could not be "
                  "written:\n  " + "\n  ".join(failed) + f"\nThe other "
                  f"{sum(map(len, parts)) - len(failed)} shards' files are written. Fix the "
                  "cause (space, permissions, train.ref_logps_dir) and run the same command "
                  "again: only the shards without a file are redone.", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"safevid: reference log-probs written for {sum(map(len, parts))} shards in "
              f"{time.perf_counter() - t0:.1f}s ({rejected} rejected pairs recorded in {rejects_path})",
              file=sys.stderr)
    return 0
