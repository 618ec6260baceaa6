"""`safevid train CONFIG [key=value ...]`: one process of a ZeRO-3 DPO run.

Reads top to bottom: config -> process group -> data -> policy and frozen reference ->
resume -> steps (a fixed number of pairs per step, split evenly over ranks) -> evaluation ->
export. The launcher starts one such process per device.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from safevid.config import check_world_size, save_config
from safevid.rank import DEFAULT_CONFIG, config_args, run_rank


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(prog="safevid train", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=None, help=f"YAML run config ({DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = p.parse_args(argv)
    return config_args(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_rank("safevid train", config, overrides, train)


def train(cfg) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers.integrations import HfDeepSpeedConfig

    from safevid import checkpoint, distributed
    from safevid import engine as setup_mod
    from safevid.config import reporters
    from safevid.data.collate import batch_inputs
    from safevid.data.indexed import IndexedStream
    from safevid.data.stream import PairStream
    from safevid.data_prep.rejects import Rejects, discard_with_rank_files, rank_file
    from safevid.demo_assets import ensure_demo_assets
    from safevid.dpo import (
        Batcher,
        StepPrefetcher,
        accumulate_step_metrics,
        count_valid,
        evaluate,
        pair_losses,
        peak_memory,
        reduce_step_metrics,
        ref_logps_of,
    )
    from safevid.export import export_hf
    from safevid.lifecycle import StopRequest, clear_stop_file, fault_delay, write_stop_file
    from safevid.losses import needs_reference
    from safevid.metrics import MetricsLog
    from safevid.models.dpo_model import freeze, load
    from safevid.optim import build_optimizer, build_scheduler
    from safevid.reference import RefTable
    from safevid.report import Reporters, check_available

    # ---- config, process group, output directory -------------------------------------------
    if cfg.demo.build:
        ensure_demo_assets(Path(cfg.demo.assets_dir), seed=cfg.demo.seed)
    check_available(reporters(cfg))
    mix, train_urls, eval_urls = data_sets(cfg)
    given = copy.deepcopy(cfg)  # config.yaml keeps train.epochs as given, so that it loads again
    stop = StopRequest()  # before the process group: a signal during start-up is kept too
    rank, world, _ = distributed.init(cfg.train.collective_timeout_s)
    micro_steps = check_world_size(cfg, world)
    # Steps from train.epochs, counted once on rank 0: every rank must run the same number.
    cfg.train.max_steps, epochs_note = distributed.from_first_rank(
        lambda: run_length(cfg, train_urls), rank)
    # What a checkpoint records: the resolved step count too, so that a resumed epoch-based run
    # whose data has grown is refused like a changed train.max_steps, not silently stretched.
    config_record = config_dict(cfg)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume = checkpoint.decide_resume(ckpt_dir, config_record, rank, cfg.train.resume_from)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(given, out / "config.yaml")
        clear_stop_file(out)
        if resume is None:  # as metrics.jsonl starts again, so do the rejects
            discard_with_rank_files(out / "rejects.jsonl")
    if resume is not None and resume.world_size != world:
        checkpoint.prepare_universal(resume, world, rank)
    dist.barrier()

    setup = setup_mod.prepare(cfg, micro_steps, world)
    device, dtype, family, backend, ds = setup.device, setup.dtype, setup.family, setup.backend, setup.ds
    ds_hf = HfDeepSpeedConfig(ds)  # noqa: F841  keeps from_pretrained partitioning under ZeRO-3
    # Optimizer states written by another world size load through DeepSpeed's universal format.
    policy_ds = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal":
                                      resume is not None and resume.world_size != world}}
    precomputed = cfg.train.reference == "precomputed"
    ref_table = None
    if precomputed:
        # Checked before any weight is read: a run that cannot use the files ends at once.
        def check_ref_files() -> RefTable:
            fp = setup_mod.ref_fingerprint(cfg, setup)
            return RefTable.load(list(dict.fromkeys(train_urls + eval_urls)), fp,
                                 cfg.train.ref_logps_dir)

        ref_table = distributed.from_first_rank(check_ref_files, rank)

    # ---- models: trainable policy, frozen reference (none for reference-free losses) ------
    torch.manual_seed(cfg.train.seed)
    policy = load(name_or_path=cfg.model.name_or_path, **setup.load_args)
    freeze(policy, cfg.model.freeze_vision, cfg.model.freeze_projector)
    if cfg.train.gradient_checkpointing:
        policy.model.hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    if setup.zero_stage >= 3:
        deepspeed.zero.register_external_parameter(policy.model.head, policy.model.hf.lm_head.weight)
    # Fused AdamW steps GPU tensors only; offloaded optimizer states are on the CPU.
    fused = device.type == "cuda" and not setup_mod.offloads_optimizer(policy_ds)
    engine, *_ = deepspeed.initialize(
        model=policy.model, model_parameters=trainable, config=policy_ds,
        optimizer=build_optimizer(trainable, cfg.train, fused=fused),
        lr_scheduler=build_scheduler(cfg.train),
    )
    _write_partition_stats(engine, out / f"zero_partition_rank{rank}.json")
    ref_engine = None
    if needs_reference(cfg.loss.type) and not precomputed:
        ref_engine, _ = setup_mod.build_reference(cfg, setup)
        # The reference was loaded under its own HfDeepSpeedConfig, now gone: the policy's is
        # transformers' current one again (is_deepspeed_zero3_enabled() asks the newest).
        ds_hf = HfDeepSpeedConfig(ds)  # noqa: F841
    batcher = Batcher(policy, cfg.data)
    if rank == 0:
        ref_desc = (f"none ({cfg.loss.type})" if not needs_reference(cfg.loss.type)
                    else "precomputed log-probs" if precomputed
                    else cfg.model.ref_name_or_path or f"{cfg.model.name_or_path} (initial weights)")
        print(f"safevid: policy {cfg.model.name_or_path}, reference: {ref_desc}, world {world}, "
              f"{str(dtype).removeprefix('torch.')}, ZeRO stage {setup.zero_stage}, "
              f"{cfg.train.pairs_per_step} pairs/step in {micro_steps} micro-steps of "
              f"{cfg.train.micro_batch_pairs} per rank, "
              f"{'fused' if cfg.train.fused_logprobs else 'plain'} log-probs", file=sys.stderr)
        print(f"safevid: family {family.name}, layout {batcher.layout.name}"
              f"{' (rows packed)' if cfg.data.shared_prefix and cfg.data.packing else ''}, "
              f"attention {backend} on {device.type}, max_length {cfg.data.max_length}, "
              f"{cfg.data.max_tokens_per_row} tokens per row", file=sys.stderr)
        if epochs_note:
            print(f"safevid: {epochs_note}", file=sys.stderr)

    # ---- resume ---------------------------------------------------------------------------
    start_step, position = checkpoint.load(engine, resume, rank) if resume else (0, (0, 0))
    if rank == 0 and resume:
        print(f"safevid: resuming from step {start_step} ({resume.path})", file=sys.stderr)
    # Each rank writes its own rejects file (one file appended to from several nodes can
    # lose lines); rank 0 merges them into rejects.jsonl when the run ends.
    rejects = Rejects(rank_file(out / "rejects.jsonl", rank), tags={"rank": rank})
    if cfg.data.loader == "indexed":
        # Each rank reads (and so rejects) only its own samples.
        stream = IndexedStream(mix or [("train", train_urls, 1.0)], cfg.train.seed,
                               cfg.train.pairs_per_step, cfg.data.groups, rejects, position)
    else:
        # Every rank reads the whole stream: rank 0 alone records what it rejects.
        stream = PairStream(train_urls, cfg.train.seed, cfg.data.shuffle_buffer,
                            rejects if rank == 0 else Rejects(None), position)
    # Decode failures, tokenization, length rules and collation happen in the prefetch thread
    # too: a pair that cannot be used is known (and weighs 0) before the step counts its
    # usable pairs. Each rank rejects its own share of the step.
    prefetch = StepPrefetcher(stream, cfg.train.pairs_per_step, rank, world,
                              cfg.data.decode_threads, rejects,
                              steps=cfg.train.max_steps - start_step, batcher=batcher,
                              micro_batch_pairs=cfg.train.micro_batch_pairs, ref_table=ref_table)
    log = MetricsLog(out / "metrics.jsonl", start_step) if rank == 0 else None
    report = None

    def start_reporters() -> None:
        nonlocal report
        report = Reporters(reporters(cfg), out, start_step, config_record)

    # Rank 0 alone starts them (W&B may fail to reach its server): every rank learns the outcome.
    distributed.from_first_rank(start_reporters, rank)

    def run_eval(step: int) -> dict:
        sets = {"heldout": eval_urls, "train": train_urls}
        fault_delay("eval")
        return evaluate(engine, ref_engine, batcher, sets, cfg, rank, world,
                        out if rank == 0 and step == cfg.train.max_steps else None, device, dtype,
                        ref_table, rejects if rank == 0 else None)

    def save(step: int) -> None:
        checkpoint.save(engine, ckpt_dir, step, position, rank, world,
                        cfg.train.keep_checkpoints, config_record)

    # ---- training steps -------------------------------------------------------------------
    engine.train()
    bar = tqdm(total=cfg.train.max_steps, initial=start_step, disable=rank != 0, desc="dpo",
               dynamic_ncols=True)
    t_start = time.perf_counter()
    stopped_by = None
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # this step's rate: the scheduler moves on at its last micro-step
        mine, batches, position = prefetch.next()
        valid = count_valid(mine, device)
        # Sum over this micro-batch's valid pairs x micro-steps x ranks / valid pairs: DeepSpeed
        # divides by the micro-steps and averages over ranks, so the gradient is that of the
        # mean over all of the step's valid pairs (with all valid: the micro-batch mean).
        scale = micro_steps * world / max(valid, 1)
        sums: dict[str, torch.Tensor] = {}
        for i, cpu_batch in zip(range(0, len(mine), cfg.train.micro_batch_pairs), batches,
                                strict=True):
            chunk = mine[i:i + cfg.train.micro_batch_pairs]
            batch = cpu_batch.to(device, dtype)
            weight = torch.tensor([float(p.valid) for p in chunk], device=device)
            logps, lengths = engine(**batch_inputs(batch))
            ref_logps = None
            if ref_engine is not None:
                with torch.no_grad():
                    ref_logps, _ = ref_engine(**batch_inputs(batch))
            elif precomputed:
                ref_logps = ref_logps_of(chunk, device, logps.dtype)
            losses, chosen_r, rejected_r = pair_losses(cfg.loss, logps, lengths, ref_logps)
            engine.backward((losses * weight).sum() * scale)
            engine.step()
            accumulate_step_metrics(sums, losses, chosen_r, rejected_r, logps, weight,
                                    batch.tokens, device)
        fault_delay("step")
        record = reduce_step_metrics(sums, valid, device)
        elapsed = time.perf_counter() - t0
        grad_norm = engine.get_global_grad_norm()
        if cfg.data.mix:
            record.update({f"pairs/{k}": v for k, v in stream.step_sources(step - 1).items()})
        record.update(
            step=step, lr=lr, pairs=valid,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            tokens_per_s=record["tokens"] / elapsed, pairs_per_s=valid / elapsed,
            step_s=elapsed, elapsed_s=time.perf_counter() - t_start,
            **peak_memory(device),
        )
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            record.update(run_eval(step))
        if step == cfg.train.max_steps:
            record.update(run_eval(step))
        if rank == 0:
            log.write(record)
            report.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracy']:.2f}")
            bar.update(1)
        saved = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.max_steps
        if saved:
            save(step)
        if cfg.train.export_every and step % cfg.train.export_every == 0:
            export_hf(policy, out / "exports" / checkpoint.tag_for(step), rank,
                      cfg.model.name_or_path)
        # One collective per step: every rank learns whether any rank was asked to stop, so
        # all of them stop after this same step (a run at its last step just finishes).
        if step < cfg.train.max_steps and (stopped_by := stop.agreed(device)):
            if not saved:
                save(step)
            break
    bar.close()
    prefetch.close()  # no rank rejects anything after this
    rejected = _close_rejects(out, rank)
    if report is not None:
        report.close()
    if stopped_by:
        if rank == 0:
            write_stop_file(out, step, stopped_by)
            print(f"safevid: stopped after step {step} on {stopped_by}; checkpoint "
                  f"{ckpt_dir / checkpoint.tag_for(step)} is complete. Run the same command "
                  "again to resume from it.", file=sys.stderr, flush=True)
        return 0

    # ---- export and summary ---------------------------------------------------------------
    # A finished run started again exports nothing new (and leaves hf/ and its times alone).
    if cfg.train.export_hf and not (start_step >= cfg.train.max_steps and (out / "hf").is_dir()):
        export_hf(policy, out / "hf", rank, cfg.model.name_or_path)
    if rank == 0:
        _summary(out, rejected)
    dist.barrier()
    return 0


def data_sets(cfg) -> tuple[list, list[str], list[str]]:
    """(mixture sources, training shards, evaluation shards) from the config."""
    from safevid.data.stream import expand_shards

    mix = [(m.name or f"mix{i}", expand_shards(m.shards, f"data.mix[{i}].shards"), m.weight)
           for i, m in enumerate(cfg.data.mix)]
    train_urls = ([u for _, urls, _ in mix for u in urls] if mix
                  else expand_shards(cfg.data.shards, "data.shards"))
    eval_urls = expand_shards(cfg.data.eval_shards, "data.eval_shards") if cfg.data.eval_shards else []
    return mix, train_urls, eval_urls


def run_length(cfg, train_urls: list[str]) -> tuple[int, str]:
    """(steps, a note): `train.max_steps` when > 0, else from `train.epochs` over every
    training pair (all mixture sources together), with a note saying so."""
    import math

    from safevid.data.indexed import load_index

    if cfg.train.max_steps:
        return cfg.train.max_steps, ""
    pairs = sum(r.pairs for r in load_index(train_urls))
    steps = max(1, math.ceil(cfg.train.epochs * pairs / cfg.train.pairs_per_step))
    return steps, (f"train.epochs={cfg.train.epochs:g} over {pairs} pairs at "
                   f"{cfg.train.pairs_per_step} per step: {steps} steps")


def config_dict(cfg) -> dict:
    """The resolved config as plain data, recorded in every checkpoint."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _write_partition_stats(engine, path: Path) -> None:
    """What this rank holds of the policy: evidence that ZeRO-3 really partitions."""
    params = list(engine.module.parameters())
    stats = {
        "stage": engine.zero_optimization_stage(),
        "total_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                           for p in params),
        "resident_numel": sum(p.data.numel() for p in params),
    }
    path.write_text(json.dumps(stats))


def _close_rejects(out: Path, rank: int) -> int:
    """The run's rejected inputs (all its ranks and starts): once every rank has stopped
    writing, rank 0 merges the ranks' files into rejects.jsonl (those a killed start left
    too) and counts its records."""
    import torch.distributed as dist

    from safevid.data_prep.rejects import merge_rank_files

    dist.barrier()
    return merge_rank_files(out / "rejects.jsonl") if rank == 0 else 0


def _summary(out: Path, rejected: int) -> None:
    from safevid.metrics import read_metrics

    rows = read_metrics(out)
    last = rows[-1]
    summary = {
        "steps": last["step"],
        "final_loss": last["loss"],
        "train_accuracy": last.get("eval/train/accuracy"),
        "heldout_accuracy": last.get("eval/heldout/accuracy"),
        "elapsed_s": last["elapsed_s"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
        "rejected_samples": rejected,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), file=sys.stderr)
