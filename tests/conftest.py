"""Shared fixtures: one build of the demo assets, and helpers that run real training processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    from safevid.demo_assets import ensure_demo_assets

    return ensure_demo_assets(tmp_path_factory.mktemp("assets") / "demo")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command(world: int, overrides: list[str]) -> list[str]:
    """`safevid train` as one bare process (world 1) or through the launcher (world > 1)."""
    if world == 1:
        return [sys.executable, "-m", "safevid", "train", DEMO_CONFIG, *overrides]
    from safevid.launcher import launch_command

    return launch_command([DEMO_CONFIG, *overrides], nproc=world)[0]


def run_train(out: Path, assets: Path, world: int = 1, extra: tuple[str, ...] = (),
              check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    overrides = [f"output_dir={out}", f"demo.assets_dir={assets}", *extra]
    proc = subprocess.run(train_command(world, overrides), env=child_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r["loss"] for r in rows]
