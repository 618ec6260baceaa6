"""`safevid generate captions | pairs | merge`: the LLM stages of the data pipeline.

Works against any OpenAI-compatible endpoint (--base-url, --model; the key is read from the
environment variable named by --api-key-env, OPENAI_API_KEY by default, and never from a flag,
so it stays out of shell history, job scripts and process lists).

Exit status: 0 done; 75 done except inputs that failed on API errors (rerun to retry them);
1 stopped after too many API failures in a row, or merge refused; 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safevid.data_prep.generate_io import (
    JobOutput,
    Outcome,
    find_parts,
    job_from_env,
    job_of,
    merge_parts,
    missing_parts,
    output_paths,
    run_pending,
)
from safevid.data_prep.generate_rules import (
    DEFAULT_PROMPTS,
    DEFAULT_TAXONOMY,
    load_prompts,
    load_taxonomy,
)
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from safevid.llm_client import LLMClient

log = logging.getLogger("safevid.generate")

EXIT_RETRY = 75  # EX_TEMPFAIL: some inputs failed on API errors; rerun the same command


class TooManyFailures(RuntimeError):
    """Many inputs in a row failed on API errors: a setting is wrong or the server is down."""


# ---- arguments ---------------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_llm_args(p: argparse.ArgumentParser, required_model: bool = True) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="API root, e.g. http://host:8000/v1 (default: $OPENAI_BASE_URL, "
                        "else OpenAI)")
    g.add_argument("--model", required=required_model, help="model name on that endpoint")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default: OPENAI_API_KEY)")
    g.add_argument("--structured-outputs", choices=("auto", "on", "off"), default="auto",
                   help="response_format json_schema: auto tries it and falls back to the "
                        "schema in the prompt when the server rejects it")
    g.add_argument("--temperature", type=float, help="sampling temperature (default: server's)")
    g.add_argument("--max-tokens", type=int, help="max_tokens per reply (default: server's)")
    g.add_argument("--param", type=_key_value, action="append", default=[], metavar="K=V",
                   help="extra API parameter for every call, value parsed as JSON "
                        "(e.g. seed=0, max_completion_tokens=2000); repeatable")
    g = p.add_argument_group("limits and retries")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    g.add_argument("--rpm", type=float, help="requests per minute (default: unlimited)")
    g.add_argument("--tpm", type=float, help="tokens per minute (default: unlimited)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (120)")
    g.add_argument("--max-retries", type=int, default=8, help="retries per request (8)")
    g.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubling per retry (1.0)")
    g.add_argument("--backoff-max", type=float, default=60.0, help="longest retry delay (60)")
    g.add_argument("--max-consecutive-failures", type=int, default=50,
                   help="stop after this many inputs in a row fail on API errors (50)")
    g = p.add_argument_group("cache and cost")
    g.add_argument("--cache", type=Path,
                   help="SQLite cache of finished calls (default: <out>.cache.sqlite)")
    g.add_argument("--no-cache", action="store_true", help="do not cache calls")
    g.add_argument("--price-input", type=float, default=0.0,
                   help="price per 1M prompt tokens, for the cost estimate")
    g.add_argument("--price-output", type=float, default=0.0,
                   help="price per 1M completion tokens, for the cost estimate")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output JSONL")
    p.add_argument("--rejects", type=Path,
                   help="rejects JSONL (default: <out stem>.rejects.jsonl)")
    g = p.add_argument_group("jobs")
    g.add_argument("--job-index", type=int,
                   help="this job's index (default: the Slurm array task's place in its "
                        "array, else 0)")
    g.add_argument("--num-jobs", type=int,
                   help="number of jobs (default: the Slurm array's task count, or the "
                        "earlier array's for a task run again alone, else 1); with more "
                        "than one, each job writes <out stem>.part-IIIII-of-NNNNN.jsonl")
    g.add_argument("--window", type=int,
                   help="inputs in progress at once (default: 2 x concurrency for pairs, "
                        "concurrency + workers for captions)")
    g.add_argument("--limit", type=int, help="process at most this many pending inputs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safevid generate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{captions,pairs,merge}")

    p = sub.add_parser("captions", help="videos -> detailed captions (or import captions)",
                       description="Describe each video with a vision chat model, or import "
                                   "captions from a file (--from).")
    p.add_argument("--videos", type=Path, help="folder of videos (searched recursively)")
    p.add_argument("--frames", type=int, default=8, help="frames per video (8)")
    p.add_argument("--size", type=int, default=336,
                   help="frame size after resize and centre crop; use prepare's value (336)")
    p.add_argument("--image-detail", choices=("low", "high", "auto"), default="low",
                   help="image detail hint for the vision model (low)")
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality of frames (85)")
    p.add_argument("--workers", type=int, default=2, help="video decoding threads (2)")
    p.add_argument("--min-words", type=int, default=20,
                   help="reject replies shorter than this: refusals, not descriptions (20)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"prompt template folder or built-in name ({DEFAULT_PROMPTS})")
    p.add_argument("--from", dest="from_file", type=Path,
                   help="import captions from this JSONL/JSON/CSV file instead of a model")
    p.add_argument("--field", action="append", default=[], metavar="OURS=THEIRS",
                   help="field mapping for --from, e.g. caption=description; repeatable")
    _add_run_args(p)
    _add_llm_args(p, required_model=False)
    p.set_defaults(func=cmd_captions)

    p = sub.add_parser("pairs", help="captions -> safety preference pairs",
                       description="Categorise each caption, write explicit, implicit and "
                                   "benign queries, chosen and rejected answers, and verify.")
    p.add_argument("--captions", type=Path, required=True, help="captions JSONL")
    p.add_argument("--taxonomy", default=DEFAULT_TAXONOMY,
                   help=f"taxonomy YAML or built-in name ({DEFAULT_TAXONOMY})")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"prompt template folder or built-in name ({DEFAULT_PROMPTS})")
    p.add_argument("--max-categories", type=int, default=3, help="categories per video (3)")
    p.add_argument("--explicit", type=int, default=1, help="explicit queries per category (1)")
    p.add_argument("--implicit", type=int, default=1, help="implicit queries per category (1)")
    p.add_argument("--benign", type=int, default=1, help="benign queries per category (1)")
    p.add_argument("--rejected-model", help="model for rejected answers (default: --model)")
    p.add_argument("--verify-model", help="model for verification (default: --model)")
    _add_run_args(p)
    _add_llm_args(p)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("merge", help="join job-array parts, deduplicated by id",
                       description="Join the .part-*-of-* files of a job array into one "
                                   "output and one rejects file, keeping each id once.")
    p.add_argument("--out", type=Path, required=True, help="merged output JSONL")
    p.add_argument("--rejects", type=Path,
                   help="merged rejects JSONL (default: <out stem>.rejects.jsonl)")
    p.add_argument("parts", type=Path, nargs="*",
                   help="part files (default: <out stem>.part-*-of-*.jsonl beside --out)")
    p.add_argument("--allow-missing", action="store_true",
                   help="merge even when some parts of the array are missing")
    p.set_defaults(func=cmd_merge)
    return parser


# ---- running a stage ---------------------------------------------------------------------------
def make_client(args: argparse.Namespace, out: Path) -> LLMClient:
    cache = None
    if not args.no_cache:
        cache = args.cache or out.with_name(out.name.removesuffix(".jsonl") + ".cache.sqlite")
    structured = {"auto": "auto", "on": True, "off": False}[args.structured_outputs]
    return LLMClient(
        base_url=args.base_url, model=args.model, api_key=os.environ.get(args.api_key_env),
        concurrency=args.concurrency, rpm=args.rpm, tpm=args.tpm, timeout=args.timeout,
        max_retries=args.max_retries, backoff_base=args.backoff, backoff_max=args.backoff_max,
        cache_path=cache, structured_outputs=structured)


def api_params(args: argparse.Namespace) -> dict:
    params = dict(args.param)
    if args.temperature is not None:
        params["temperature"] = args.temperature
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    return params


class Tally:
    """Counts of one run, the progress bar, and the guard against a run of API failures."""

    def __init__(self, stage: str, bar: tqdm, max_failures: int) -> None:
        self.stage, self.bar, self.max_failures = stage, bar, max_failures
        self.c: Counter = Counter()
        self.reasons: Counter = Counter()
        self.drop_stages: Counter = Counter()
        self.streak = 0

    def __call__(self, outcome: Outcome) -> None:
        c = self.c
        c["processed"] += 1
        c["records"] += len(outcome.records)
        c["drops"] += len(outcome.drops)
        self.drop_stages.update(d["stage"] for d in outcome.drops)
        if outcome.reject is not None:
            rej = outcome.reject
            c["rejected"] += 1
            c["retryable"] += int(rej["retryable"])
            reason = rej["reason"].removeprefix(f"{rej['source']}: ")
            self.reasons[f"{rej['stage']}: {reason[:60]}"] += 1
            log.warning("rejected %s: %s", rej["source"], reason)
            self.streak = self.streak + 1 if rej["retryable"] else 0
        else:
            c["written"] += 1
            self.streak = 0
        self.bar.update(1)
        self.bar.set_postfix(records=c["records"], rejected=c["rejected"], refresh=False)
        if self.streak >= self.max_failures:
            raise TooManyFailures(f"{self.streak} inputs in a row failed on API errors; last: "
                                  f"{outcome.reject['reason']}")


async def run_stage(stage: str, args: argparse.Namespace, output: JobOutput,
                    inputs: list[tuple[str, object]], process, client: LLMClient | None,
                    window: int) -> int:
    """Run `process` over the pending inputs, then print the summary table."""
    started = time.monotonic()
    bar = tqdm(total=len(inputs), desc=f"generate {stage}", unit="input", dynamic_ncols=True,
               disable=args.no_progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    tally = Tally(stage, bar, args.max_consecutive_failures)
    error: BaseException | None = None
    try:
        with logging_redirect_tqdm():
            await run_pending(inputs, process, output, window, tally)
    except TooManyFailures as exc:
        error = exc
    finally:
        bar.close()
        output.close()
        if client is not None:
            await client.aclose()
    print_summary(stage, args, output, tally, client, time.monotonic() - started)
    if error is not None:
        log.error("stopped: %s. Fix the endpoint or settings and rerun the same command; "
                  "finished work is kept.", error)
        return 1
    return EXIT_RETRY if tally.c["retryable"] else 0


def print_summary(stage: str, args: argparse.Namespace, output: JobOutput, tally: Tally,
                  client: LLMClient | None, seconds: float) -> None:
    c, r = tally.c, output.resumed
    item = "pairs" if stage == "pairs" else "captions"
    rows: list[tuple[str, object]] = [
        ("output", str(output.out_path)),
        ("rejects", str(output.rejects_path)),
        ("inputs finished before (resumed)",
         f"{r['inputs written'] + r['inputs rejected']} "
         f"(written {r['inputs written']}, rejected {r['inputs rejected']})"),
        ("inputs processed now", c["processed"]),
        ("  written", c["written"]),
        ("  rejected", f"{c['rejected']} (retryable {c['retryable']})"),
        ("  check: written + rejected",
         "ok" if c["written"] + c["rejected"] == c["processed"] else "MISMATCH"),
        (f"{item} written now", c["records"]),
    ]
    if stage == "pairs":
        stages = ", ".join(f"{k} {v}" for k, v in tally.drop_stages.most_common())
        rows.append(("pairs dropped now", f"{c['drops']}" + (f" ({stages})" if stages else "")))
    if output.repaired:
        rows.append(("lines repaired on resume", output.repaired))
    for reason, n in tally.reasons.most_common(5):
        rows.append((f"  reject: {reason}", n))
    if client is not None:
        rows += client.stats.summary_rows(args.price_input, args.price_output)
    rows.append(("wall time (s)", f"{seconds:.1f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"safevid generate {stage}: summary", "-" * (width + 24)]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    print("\n".join(lines), flush=True)
    if c["retryable"]:
        print(f"{c['retryable']} inputs failed on API errors and were not written off: rerun "
              "the same command to retry them (finished calls come from the cache).", flush=True)


def _job(args: argparse.Namespace) -> tuple[int, int, JobOutput]:
    index, count = job_from_env(args.job_index, args.num_jobs, args.out)
    out, rejects = output_paths(args.out, args.rejects, index, count)
    output = JobOutput(out, rejects)
    if output.repaired:
        log.info("%s: removed %d torn or unfinished lines left by an interrupted run",
                 out, output.repaired)
    return index, count, output


def _pending(inputs, index: int, count: int, output: JobOutput, limit: int | None) -> list:
    mine = [(k, v) for k, v in inputs if job_of(k, count) == index and k not in output.done]
    return mine[:limit] if limit is not None else mine


def cmd_captions(args: argparse.Namespace) -> int:
    from safevid.data_prep.generate_captions import (
        CaptionSettings,
        VideoCaptioner,
        import_captions,
        list_videos,
        parse_field_map,
    )

    if args.from_file is None and (args.videos is None or not args.model):
        raise SystemExit("safevid generate captions: give --videos and --model, or --from FILE")
    if args.videos is not None and not args.videos.is_dir():
        raise SystemExit(f"safevid generate captions: {args.videos} is not a folder")
    index, count, output = _job(args)
    if args.from_file is not None:
        mapping = parse_field_map(args.field)
        inputs = _pending(import_captions(args.from_file, mapping, args.videos,
                                          str(args.from_file)), index, count, output, args.limit)

        async def passthrough(key: str, item: object) -> Outcome:
            return item  # type: ignore[return-value]

        return asyncio.run(run_stage("captions", args, output, inputs, passthrough, None, 1))

    prompts = load_prompts(args.prompts)
    settings = CaptionSettings(videos=args.videos, num_frames=args.frames, size=args.size,
                               image_detail=args.image_detail, jpeg_quality=args.jpeg_quality,
                               params=api_params(args), min_words=args.min_words)
    inputs = _pending(((rel, rel) for rel in list_videos(args.videos)), index, count, output,
                      args.limit)

    async def go() -> int:
        client = make_client(args, output.out_path)
        with ThreadPoolExecutor(args.workers, thread_name_prefix="decode") as pool:
            captioner = VideoCaptioner(client, prompts, settings, pool)
            window = args.window or args.concurrency + args.workers
            return await run_stage("captions", args, output, inputs, captioner, client, window)

    return asyncio.run(go())


def cmd_pairs(args: argparse.Namespace) -> int:
    from safevid.data_prep.generate_pairs import PairGenerator, PairSettings, read_captions

    if not args.captions.is_file():
        raise SystemExit(f"safevid generate pairs: {args.captions} does not exist")
    taxonomy = load_taxonomy(args.taxonomy)
    prompts = load_prompts(args.prompts)
    settings = PairSettings(
        max_categories=args.max_categories,
        queries={"explicit": args.explicit, "implicit": args.implicit, "benign": args.benign},
        models={"rejected": args.rejected_model, "verify": args.verify_model},
        params=api_params(args))
    index, count, output = _job(args)
    inputs = _pending(read_captions(args.captions), index, count, output, args.limit)

    async def go() -> int:
        client = make_client(args, output.out_path)
        generator = PairGenerator(client, taxonomy, prompts, settings)
        window = args.window or 2 * args.concurrency
        return await run_stage("pairs", args, output, inputs, generator, client, window)

    return asyncio.run(go())


def cmd_merge(args: argparse.Namespace) -> int:
    rejects = args.rejects or args.out.with_name(
        args.out.name.removesuffix(".jsonl") + ".rejects.jsonl")
    parts = args.parts or find_parts(args.out)
    if not parts:
        log.error("no parts found beside %s (expected %s.part-*-of-*.jsonl)", args.out,
                  args.out.name.removesuffix(".jsonl"))
        return 1
    missing = missing_parts(parts)
    if missing and not args.allow_missing:
        log.error("parts missing: %s (pass --allow-missing to merge anyway)", ", ".join(missing))
        return 1
    stats = merge_parts(parts, args.out, rejects)
    rows = [("parts", len(parts)), ("output", str(args.out)), ("rejects", str(rejects))]
    rows += sorted(stats.items())
    width = max(len(k) for k, _ in rows)
    print("\n".join(["safevid generate merge: summary"] + [f"{k:<{width}}  {v}" for k, v in rows]))
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # HTTP libraries log request details at DEBUG/INFO; keep them quiet whatever our level.
    for name in ("openai", "httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2


__all__ = ["build_parser", "main"]
