"""`safevid plot RUN_DIR`: loss, reward margin and reward accuracy over steps, as one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from safevid.metrics import read_metrics


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "rewards/margin", "rewards/accuracy"),
                              ("DPO loss", "reward margin (chosen - rejected)", "reward accuracy"),
                              strict=True):
        ax.plot(steps, [r[key] for r in rows], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    held = [(r["step"], r["eval/heldout/accuracy"]) for r in rows if "eval/heldout/accuracy" in r]
    if held:
        axes[2].plot(*zip(*held, strict=True), "o", color="C3", label="held-out")
        axes[2].legend()
    fig.suptitle(f"SafeVid DPO: {run_dir}")
    fig.tight_layout()
    out = out or Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="safevid plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"safevid plot: no metrics.jsonl in {args.run_dir}", file=__import__("sys").stderr)
        return 2
    print(plot_run(args.run_dir, args.out))
    return 0
