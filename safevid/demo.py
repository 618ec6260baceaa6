"""`safevid demo [--out DIR] [key=value ...]`: the whole path on the embedded default.

Synthetic videos -> shards -> tiny LLaVA-NeXT-Video -> ZeRO-3 DPO on 2 local processes ->
held-out evaluation -> summary table and curves.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from safevid.config import load_config, resolve_path

DEMO_CONFIG = "configs/demo.yaml"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="safevid demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="run directory (runs/demo)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (2)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args(argv)

    from safevid.demo_assets import ensure_demo_assets
    from safevid.launcher import launch_command
    from safevid.plot import plot_run

    t0 = time.perf_counter()
    config = str(resolve_path(DEMO_CONFIG))
    overrides = [f"output_dir={args.out}", *args.overrides]
    cfg = load_config(config, overrides)
    print(f"[1/3] demo data and tiny model in {cfg.demo.assets_dir}", flush=True)
    ensure_demo_assets(Path(cfg.demo.assets_dir), seed=cfg.demo.seed)
    print(f"[2/3] ZeRO-3 DPO on {args.nproc} processes -> {args.out}", flush=True)
    cmd, env = launch_command([config, *overrides], nproc=args.nproc)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"safevid demo: training failed (exit {rc})", file=sys.stderr)
        return rc
    print("[3/3] evaluation and curves", flush=True)
    out = Path(args.out)
    summary = json.loads((out / "summary.json").read_text())
    png = plot_run(out)
    rows = [
        ("steps", summary["steps"]),
        ("final loss", summary["final_loss"]),
        ("reward accuracy, training pairs", summary["train_accuracy"]),
        ("reward accuracy, held-out pairs", summary["heldout_accuracy"]),
        ("training time (s)", summary["elapsed_s"]),
        ("total time (s)", time.perf_counter() - t0),
        ("rejected samples", summary["rejected_samples"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nSafeVid demo summary")
    print("-" * (width + 12))
    for key, value in rows:
        print(f"{key:<{width}}  {_fmt(value):>9}")
    print("-" * (width + 12))
    print(f"metrics: {out / 'metrics.jsonl'}\ncurves:  {png}\nmodel:   {out / 'hf'}")
    return 0
