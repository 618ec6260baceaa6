"""`safevid eval`: a model answers a video safety benchmark, a judge scores it, a report follows.

    safevid eval --model DIR --bench FILE --out DIR [--judge-base-url URL --judge-model NAME]
    safevid eval --compare A B [--out DIR]
    python -m safevid.launcher --command eval --nproc-per-node N --model ...   # N processes

Generation splits over the processes that the training launcher starts (one per GPU; the
answers do not depend on how many); the first process then merges, judges and reports.
Every stage is resumable: run the same command again on the same --out after an interruption.
The judge's API key is read from OPENAI_API_KEY and never written anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MANIFEST = "eval_config.json"
# Settings that change answers or judgments: an --out made with others cannot be resumed.
GENERATION_KEYS = ("model", "model_files", "frames", "max_new_tokens", "temperature", "seed",
                   "dtype", "batch_size")


def model_fingerprint(model_dir: Path) -> list[list]:
    """Name, size and modification time of each weight file: answers from an --out whose model
    was retrained (or re-exported) since are not resumed as if they were this model's."""
    files = sorted(p for p in model_dir.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safevid eval", description=__doc__.splitlines()[0])
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two eval output dirs (A before, B after) instead of running")
    p.add_argument("--model", help="transformers model dir (a run's RUN_DIR/hf); not needed with "
                                   "--generator-base-url")
    p.add_argument("--bench", help="benchmark file (JSONL)")
    p.add_argument("--format", default="safevid", choices=("safevid", "video-safetybench"))
    p.add_argument("--kind", choices=("harmful", "implicit", "benign"),
                   help="video-safetybench: kind of every query in the file (default: benign "
                        "when the file name contains 'benign', else harmful)")
    p.add_argument("--videos", help="folder the video paths are relative to (default: the bench "
                                    "file's folder); every video must then lie inside it")
    p.add_argument("--out", help="output dir (eval), or where compare.md/json go (default .)")
    p.add_argument("--limit", type=int, help="only the first N bench rows")
    g = p.add_argument_group("generation")
    g.add_argument("--frames", type=int, help="frames per video (default: the training "
                   "shards' count when it can be found beside the model, else 8)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bf16 on a GPU that has it, else fp32")
    g.add_argument("--device", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    g.add_argument("--generator-base-url", help="answers from this OpenAI-compatible server (e.g. "
                   "vLLM serving the policy) instead of a local model")
    g.add_argument("--generator-model", help="the served model's name (with --generator-base-url)")
    g.add_argument("--generator-concurrency", type=int, default=16)
    r = p.add_argument_group("judge-free metrics (DPO reward of --model against --reference)")
    r.add_argument("--pairs", help="held-out preference shards (brace patterns or globs)")
    r.add_argument("--reference", help="the reference model dir (e.g. the model trained from)")
    r.add_argument("--beta", type=float, default=0.1, help="the DPO beta of the rewards (0.1)")
    r.add_argument("--max-pairs", type=int, default=512)
    j = p.add_argument_group("judge (default: the offline heuristic)")
    j.add_argument("--judge-base-url", help="OpenAI-compatible API root, e.g. http://host:8000/v1")
    j.add_argument("--judge-model", help="judge model name; enables the LLM judge")
    j.add_argument("--judge-concurrency", type=int, default=8)
    j.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    j.add_argument("--judge-max-retries", type=int, default=6)
    j.add_argument("--judge-backoff", type=float, default=1.0, help="first retry delay (s)")
    j.add_argument("--judge-rpm", type=float, help="requests per minute")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_manifest(out: Path, manifest: dict) -> str | None:
    """Why `out` cannot be resumed with these settings, or None."""
    path = out / MANIFEST
    if not path.is_file():
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return None
    old = json.loads(path.read_text())
    for key in GENERATION_KEYS:
        if old["generation"].get(key) != manifest["generation"].get(key):
            return (f"{out} holds answers made with {key}={old['generation'].get(key)!r}, not "
                    f"{manifest['generation'].get(key)!r}: use another --out")
    if old["judge"] != manifest["judge"]:
        return f"{out} holds judgments by {old['judge']}, not {manifest['judge']}: use another --out"
    return None


def _process_group() -> tuple[int, int]:
    """(rank, world size) under the launcher, joined over gloo: generation needs no collective
    but two barriers, and gloo serves those on GPU hosts too. Generating a large bench can keep
    the first process waiting for hours, hence the long timeout."""
    import os
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(hours=48))
    return dist.get_rank(), world


def _agree(rank: int, world: int, value):
    """Rank 0's `value` on every rank (so that every process takes the same exit)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(args: argparse.Namespace) -> int:
    rank, world = _process_group()
    rc = _run(args, rank, world)
    if world > 1:
        from safevid.distributed import shutdown

        # Every rank past its last collective before any tears the group down (a barrier,
        # then destroy): destroying it while a peer still had an operation in flight aborted a
        # finished process now and then ("terminate called without an active exception"). A
        # rank that raised skips this and ends; the launcher then ends the others.
        shutdown()
    return rc


def _run(args: argparse.Namespace, rank: int, world: int) -> int:
    import os

    from safevid.data_prep.rejects import Rejects
    from safevid.eval.bench import BenchError, load_bench
    from safevid.eval.generate import (
        LocalModel,
        default_num_frames,
        generate_answers,
        merge_answer_logs,
        read_answers,
        read_video_errors,
        video_reject,
    )
    from safevid.eval.judge import JudgeSettings, judge_answers, read_judgments
    from safevid.eval.report import build_report, summary_table, write_report

    if args.judge_base_url and not args.judge_model:
        print("safevid eval: --judge-base-url needs --judge-model", file=sys.stderr)
        return 2
    if args.pairs and not (args.reference and args.model):
        print("safevid eval: --pairs needs --reference and a local --model", file=sys.stderr)
        return 2
    if bool(args.generator_base_url) != bool(args.generator_model):
        print("safevid eval: --generator-base-url and --generator-model go together",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.generator_base_url:
        from safevid.eval.server_generate import ServerModel, ServerSettings

        server = ServerModel(ServerSettings(
            args.generator_base_url, args.generator_model, args.generator_concurrency,
            max_retries=args.judge_max_retries, backoff_base=args.judge_backoff, seed=args.seed))
        model_name, files = f"{args.generator_model} (served)", []
        frames, frames_from = 0, "the generation server"
    else:
        model_dir = Path(args.model).resolve()
        model_name, files = str(model_dir), model_fingerprint(model_dir)
        frames, frames_from = ((args.frames, "--frames") if args.frames
                               else default_num_frames(model_dir))
    generation = {"model": model_name, "model_files": files,
                  "frames": frames, "frames_from": frames_from,
                  "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                  "seed": args.seed, "dtype": args.dtype, "batch_size": args.batch_size}
    settings = JudgeSettings(
        model=args.judge_model or "", base_url=args.judge_base_url,
        concurrency=args.judge_concurrency, timeout=args.judge_timeout,
        max_retries=args.judge_max_retries, backoff_base=args.judge_backoff, rpm=args.judge_rpm)
    problem = None
    if rank == 0:
        problem = _check_manifest(out, {"generation": generation, "judge": settings.describe()})
    problem = _agree(rank, world, problem)
    if problem:
        if rank == 0:
            print(f"safevid eval: {problem}", file=sys.stderr)
        return 2
    try:
        bench = load_bench(args.bench, args.format, args.videos, args.kind, args.limit)
    except BenchError as exc:
        if rank == 0:
            print(f"safevid eval: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"bench: {len(bench.items)} items, {len(bench.rejects)} rejected rows; model "
              f"{model_name} ({frames or 'its'} frames from {frames_from}), {world} process(es)",
              file=sys.stderr)
    device = args.device
    if device is None and world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    answers_path = out / "answers.jsonl"
    gen = generate_answers(
        bench.items, (lambda: server) if server else
        (lambda: LocalModel(model_dir, frames, device, args.dtype)),
        answers_path, args.batch_size, args.max_new_tokens, args.temperature,
        args.seed, progress=not args.no_progress and rank == 0, rank=rank, world=world)
    if world > 1:
        import torch
        import torch.distributed as dist

        count = torch.tensor([gen.generated])
        dist.all_reduce(count)  # also the barrier: every part is complete after it
        gen.generated = int(count.item())
        if rank != 0:
            return 0
        merge_answer_logs(answers_path, bench.items)
    # Undecodable videos, whichever process met them (and in which run), from the merged log.
    video_errors = read_video_errors(answers_path)
    answers = read_answers(answers_path)
    gen.rejected = [video_reject(item, video_errors[item.id]["video_error"])
                    for item in bench.items if item.id in video_errors and item.id not in answers]
    # Items without an answer now failed at a generation server, on this process or another;
    # they are rejected for this report only (not logged), so a rerun asks again.
    reasons = {item.id: reason for item, reason in (server.failures if server else [])}
    gen.rejected += [video_reject(item, reasons.get(item.id, "generation server: no answer "
                                                    "(failed on another process)"))
                     for item in bench.items if item.id not in answers
                     and item.id not in video_errors]
    rejects = Rejects(out / "rejects.jsonl", fresh=True, prefix="safevid eval")
    for r in bench.rejects + gen.rejected:
        rejects.add(r.source, r.reason, id=r.id, category=r.category)
    judged = judge_answers(bench.items, answers, out, settings, progress=not args.no_progress)

    generation.update(generated=gen.generated, resumed=gen.resumed)
    report = build_report(bench, bench.rejects + gen.rejected, answers,
                          read_judgments(out / "judgments.jsonl"), settings.describe(),
                          generation)
    if args.pairs:
        from safevid.eval import rewards

        rows = rewards.pair_rewards(model_dir, args.reference, args.pairs, args.beta,
                                    args.max_pairs, device=args.device, rejects=Rejects(None),
                                    dtype=args.dtype)
        with open(out / "judge_free.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        report["judge_free"] = {"pairs_from": args.pairs, "reference": str(args.reference),
                                "beta": args.beta, **rewards.summarize(rows)}
    write_report(report, out)
    print(summary_table(report))
    if "judge_free" in report:
        from safevid.eval.rewards import table

        print(f"judge-free: DPO reward against {args.reference} (beta {args.beta}) on "
              f"held-out pairs\n{table(report['judge_free'])}")
    print(f"this run: {gen.generated} answers generated ({gen.resumed} resumed), "
          f"{judged.judged} judged, {judged.failed} judge failures ({judged.resumed} resumed)")
    if judged.usage is not None:
        for name, value in judged.usage.summary_rows():
            print(f"  {name:<28} {value}")
    print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return 0


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.compare:
        from safevid.eval.compare import compare_dirs, compare_table

        for d in args.compare:
            if not (Path(d) / "report.json").is_file():
                print(f"safevid eval: {d} has no report.json (not a finished eval --out)",
                      file=sys.stderr)
                return 2
        comparison = compare_dirs(*args.compare, args.out or ".")
        print(compare_table(comparison))
        print(f"written: {Path(args.out or '.') / 'compare.md'}, compare.json")
        return 0
    needed = ("bench", "out") if args.generator_base_url else ("model", "bench", "out")
    missing = [f"--{k}" for k in needed if not getattr(args, k)]
    if missing:
        p.error(f"{', '.join(missing)} required (or --compare A B)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
