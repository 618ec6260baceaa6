"""Python side of the GPU check (benchmarks/gpu_check.sh): each sub-command is one step's work.

    install  --wheels DIR --site DIR        carried wheels that this Python lacks -> DIR
    info     [--require-cuda]               device, versions, the accelerator DeepSpeed picks
    build-7b --out DIR --assets DIR [...]   random LLaVA-NeXT-Video from the 7B config
    train    --result FILE [--no-checkpoint] -- CONFIG key=value ...
    summary  --work DIR [--json FILE]       the table of all steps

`train` runs `safevid train` in this process, so that it can read the peak memory afterwards:
torch.cuda.max_memory_allocated() on a GPU, the process's peak resident set on CPU.
The trainer records neither, and a sampler outside the process would see the caching
allocator's reserve rather than what the run really used.

Only the standard library is imported at module level: `install` runs before the carried
packages are importable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
# Peak-memory estimate for ZeRO-3 on one GPU with bf16 weights, a client AdamW and a frozen
# reference (bytes per parameter). Trainable: bf16 weight 2 + bf16 gradient 2 + fp32 master 4 +
# Adam moments 8; the reference holds a bf16 copy of everything (2), the policy's frozen
# vision tower and projector are bf16 only (2).
TRAINABLE_BYTES, FROZEN_BYTES, REFERENCE_BYTES = 16, 2, 2
# Transients on top of the states: one optimizer sub-group's fp32 gradients during the step
# (DeepSpeed's default sub_group_size, 1e9 elements), the gathered weights in flight
# (stage3_max_live_parameters of ds_configs/zero3.json, 1e9 bf16), and an allowance for
# activations under gradient checkpointing, the CUDA context and allocator slack.
SUB_GROUP, LIVE_PARAMS, ALLOWANCE_GIB = 10**9, 10**9, 5.0


def cmd_install(args: argparse.Namespace) -> int:
    """pip-install the wheels in --wheels whose distribution is missing or at another version."""
    from importlib import metadata

    wanted, present = [], []
    for wheel in sorted(Path(args.wheels).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have == version:
            present.append(f"{name} {version}")
        else:
            wanted.append(str(wheel))
    print(f"already installed: {', '.join(present) or 'none'}")
    if not wanted:
        print("nothing to install")
        return 0
    print("installing: " + ", ".join(Path(w).name for w in wanted))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", args.site,
           *wanted]
    return subprocess.run(cmd).returncode


def cmd_info(args: argparse.Namespace) -> int:
    import platform
    from importlib import metadata

    import torch

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    for dist in ("torch", "triton", "transformers", "accelerate", "deepspeed", "webdataset",
                 "decord", "av", "omegaconf", "sentencepiece", "pydantic", "numpy", "pytest"):
        try:
            print(f"  {dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"  {dist} MISSING")
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / GIB, 1),
                    capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(device="cpu")
    # Importing deepspeed here proves it imports, and shows which accelerator it picked: it
    # must be cuda on the GPU, never the cpu fallback.
    from deepspeed.accelerator import get_accelerator

    info["ds_accelerator"] = get_accelerator()._name
    print(json.dumps(info))
    _write(args.result, info)
    if args.require_cuda and (info["device"] == "cpu" or info["ds_accelerator"] != "cuda"):
        print("gpu check: CUDA is not usable here (or DeepSpeed did not pick it)", file=sys.stderr)
        return 1
    return 0


def zero3_estimate_gib(trainable: int, frozen: int) -> float:
    states = TRAINABLE_BYTES * trainable + FROZEN_BYTES * frozen
    states += REFERENCE_BYTES * (trainable + frozen)
    transient = 4 * min(trainable, SUB_GROUP) + 2 * LIVE_PARAMS
    return (states + transient) / GIB + ALLOWANCE_GIB


def cmd_build_7b(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig

    from safevid.demo_assets import demo_texts, ensure_demo_assets
    from safevid.models.tiny import build_llava_next_video_from_config

    ensure_demo_assets(Path(args.assets))
    if args.small:
        # The CPU dry run: the 7B's geometry (336 px, patch 14, vocabulary 32064) at toy widths.
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, projection_dim=32)
        text = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                    num_key_value_heads=4)
    else:
        vision = text = None
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    out = build_llava_next_video_from_config(
        demo_texts(), args.out, args.layers, vision=vision, text=text, seed=0,
        device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    seconds = time.perf_counter() - t0
    trainable, frozen = _param_counts(AutoConfig.from_pretrained(out))
    result = {"layers": args.layers, "small": args.small, "params": trainable + frozen,
              "trainable": trainable, "estimate_gib": round(zero3_estimate_gib(trainable, frozen), 1),
              "build_s": round(seconds, 1)}
    print(json.dumps(result))
    _write(args.result, result)
    return 0


def _param_counts(config) -> tuple[int, int]:
    """(language model + LM head, vision tower + projector + the rest) parameter counts."""
    import torch
    from transformers import LlavaNextVideoForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    text = sum(p.numel() for p in model.model.language_model.parameters())
    text += model.lm_head.weight.numel()
    return text, total - text


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    import safevid.checkpoint
    import safevid.train

    if args.no_checkpoint:
        # The trainer always saves at its last step. For a multi-billion-parameter random model
        # that is tens of GB of fp32 optimizer state written to disk, which checks nothing
        # about the GPU paths and takes a minute of the budget.
        safevid.checkpoint.save = lambda *a, **k: None
    t0 = time.perf_counter()
    rc = safevid.train.main(args.train_args)
    wall = time.perf_counter() - t0
    out_dir = _override(args.train_args, "output_dir")
    rows = []
    if out_dir and (Path(out_dir) / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
    # Step 1 pays for Triton autotuning and allocator warm-up: leave it out when there are more.
    steady = rows[1:] if len(rows) > 1 else rows
    result = {"rc": rc, "steps": len(rows), "wall_s": round(wall, 1)}
    if rows:
        result.update(
            tokens_per_s=round(statistics.median(r["tokens_per_s"] for r in steady), 1),
            step_s=round(statistics.median(r["tokens"] / r["tokens_per_s"] for r in steady), 3),
            tokens_per_step=round(statistics.mean(r["tokens"] for r in rows)),
            loss_first=rows[0]["loss"], loss_last=rows[-1]["loss"],
            # Loading, the optimizer set-up, evaluation and export: all but the steps.
            other_s=round(wall - rows[-1]["elapsed_s"], 1),
        )
    if torch.cuda.is_available():
        result.update(peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                      reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
                      peak_kind="cuda max allocated")
    else:
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(peak_gib=round(rss_kib / 2**20, 2), peak_kind="CPU max RSS")
    print(json.dumps(result))
    _write(args.result, result)
    return rc or (0 if rows else 1)


def _override(train_args: list[str], key: str) -> str | None:
    for item in train_args:
        if item.startswith(key + "="):
            return item.split("=", 1)[1]
    return None


def _write(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _step_note(name: str, work: Path) -> str:
    res = work / "results"
    if name == "device":
        d = _load(res / "device.json")
        return (f"{d.get('device', '?')}, {d.get('memory_gib', '-')} GiB, torch {d.get('torch')}, "
                f"deepspeed accelerator {d.get('ds_accelerator')}") if d else ""
    if name == "kernels":
        lines = (work / "logs" / "kernels.log").read_text().splitlines() \
            if (work / "logs" / "kernels.log").is_file() else []
        ends = [x.strip("= ") for x in lines if " passed" in x or " failed" in x or " error" in x]
        return ends[-1] if ends else ""
    if name == "bench":
        rows = _load(res / "bench.json").get("rows", [])
        return "; ".join(f"{r['case']}: time x{r['time_ratio']:.2f}, memory x{r['mem_ratio']:.3f}"
                         for r in rows)
    if name == "train_bench":
        t = _load(res / "train_bench.json").get("variants", {})
        if "plain twin" not in t:
            return ""
        base = t["plain twin"]
        return "; ".join(f"{n} {x['pairs_per_s']:.2f} pairs/s "
                         f"({x['pairs_per_s'] / base['pairs_per_s']:.2f}x), "
                         f"{x['flops_per_s'] / 1e12:.0f} TFLOP/s, peak {x['peak_mib'] / 1024:.1f} GiB"
                         for n, x in t.items())
    if name == "llava7b_build":
        b = _load(res / "llava7b_build.json")
        if not b:
            return ""
        note = f"{b['layers']} text layers, {b['params'] / 1e9:.3f}B params"
        return note if b["small"] else note + f", estimated peak {b['estimate_gib']} GiB"
    if name.endswith("_dpo"):
        r = _load(res / f"{name}.json")
        return (f"{r.get('steps')} steps, {r.get('tokens_per_step')} tokens/step, step "
                f"{r.get('step_s')} s, loss {r.get('loss_first', 0):.4f} -> "
                f"{r.get('loss_last', 0):.4f}, setup+eval {r.get('other_s')} s") if r else ""
    return ""


def compare_layout_runs(a: Path, b: Path) -> dict:
    """Largest relative differences of loss and grad_norm between two runs' steps."""
    if not ((a / "metrics.jsonl").is_file() and (b / "metrics.jsonl").is_file()):
        return {}
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x]
            for d in (a, b)]
    pairs = list(zip(*rows, strict=False))
    out: dict = {"steps": len(pairs)}
    for key in ("loss", "grad_norm"):
        out[key] = max(abs(x[key] - y[key]) / max(abs(y[key]), 1e-12) for x, y in pairs)
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    work = Path(args.work)
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, status, seconds = line.split("\t")
        steps.append({"step": name, "status": status, "seconds": float(seconds),
                      "note": _step_note(name, work)})
    runs = {name: _load(work / "results" / f"{name}.json")
            for name in ("demo_dpo", "llava7b_dpo", "demo_packed", "qwen_demo")}
    print("\n## GPU check summary\n")
    print("| step | status | s | notes |")
    print("|---|---|--:|---|")
    for s in steps:
        print(f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['note']} |")
    build = _load(work / "results" / "llava7b_build.json")
    estimate = {"llava7b_dpo": build.get("estimate_gib", "-") if not build.get("small") else "-"}
    print("\n| run | tokens/s | peak memory GiB | measured as | reserved GiB | estimate GiB |")
    print("|---|--:|--:|---|--:|--:|")
    for name, r in runs.items():
        print(f"| {name} | {r.get('tokens_per_s', '-')} | {r.get('peak_gib', '-')} | "
              f"{r.get('peak_kind', '-')} | {r.get('reserved_gib', '-')} | "
              f"{estimate.get(name, '-')} |")
    layouts = compare_layout_runs(work / "demo_run", work / "demo_packed_run")
    if layouts:
        print(f"\nshared-prefix (demo_dpo) vs packed (demo_packed), {layouts['steps']} steps: "
              f"max relative difference of loss {layouts['loss']:.2e}, of grad_norm "
              f"{layouts['grad_norm']:.2e} (bf16: the layouts round differently)")
    failed = [s["step"] for s in steps if s["status"] not in ("ok", "skipped")]
    print(f"\ngpu check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}")
    summary = {"steps": steps, "runs": runs, "failed": failed,
               "device": _load(work / "results" / "device.json"),
               "bench": _load(work / "results" / "bench.json"),
               "llava7b_build": build, "layouts": layouts}
    _write(args.json, summary)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("install")
    s.add_argument("--wheels", required=True)
    s.add_argument("--site", required=True)
    s = sub.add_parser("info")
    s.add_argument("--require-cuda", action="store_true")
    s.add_argument("--result")
    s = sub.add_parser("build-7b")
    s.add_argument("--out", required=True)
    s.add_argument("--assets", required=True, help="demo assets (their texts train the tokenizer)")
    s.add_argument("--layers", type=int, required=True, help="text layers (the 7B has 32)")
    s.add_argument("--small", action="store_true", help="toy widths, for the CPU dry run")
    s.add_argument("--result")
    s = sub.add_parser("train")
    s.add_argument("--result")
    s.add_argument("--no-checkpoint", action="store_true", help="skip the trainer's checkpoints")
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- CONFIG key=value ...")
    s = sub.add_parser("summary")
    s.add_argument("--work", required=True)
    s.add_argument("--json")
    args = p.parse_args(argv)
    if args.cmd == "train":
        args.train_args = [a for a in args.train_args if a != "--"]
    commands = {"install": cmd_install, "info": cmd_info, "build-7b": cmd_build_7b,
                "train": cmd_train, "summary": cmd_summary}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
