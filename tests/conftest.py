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
    from safevid.launcher.local import cpu_job_env

    return cpu_job_env()


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


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


# Interruption, elastic and cluster tests: warm-up and a decaying schedule (a scheduler that
# is not restored shows), checkpoints every 2 steps, held-out evaluation every 3.
LIFE = ("train.max_steps=8", "train.save_every=2", "train.eval_every=3", "train.export_hf=false",
        "train.warmup_steps=2", "train.lr_schedule=cosine", "train.keep_checkpoints=2")


@pytest.fixture(scope="session")
def life_baseline(demo_assets, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run that interrupted, elastic and Slurm runs must reproduce."""
    out = tmp_path_factory.mktemp("life") / "run"
    run_train(out, demo_assets, world=2, extra=LIFE)
    return out


class Running:
    """A training command in its own process group, its stderr collected line by line."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        import threading

        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Until a stderr line contains `text`; fails if the process ends first."""
        import time

        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None:
                self._reader.join(5)
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"ended ({self.proc.returncode}) before {text!r}:\n"
                                     f"{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_train(out: Path, assets: Path, world: int, extra: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> Running:
    overrides = [f"output_dir={out}", f"demo.assets_dir={assets}", *extra]
    return Running(train_command(world, overrides), {**child_env(), **(env or {})})


def shm_segments() -> set[str]:
    """DeepSpeed all-reduce segments in /dev/shm that no live process maps: left behind."""
    from safevid.distributed import SHM_DIR, SHM_PREFIX, mapped_shm_names

    return {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}_*")} - mapped_shm_names()


@pytest.fixture(scope="session", autouse=True)
def shm_left_as_found():
    """The suite leaves /dev/shm as it found it: every run, killed ones included, removes its
    DeepSpeed all-reduce segments (66 MB per rank that otherwise stay until deleted by hand)."""
    before = shm_segments()
    yield
    left = sorted(shm_segments() - before)
    assert not left, f"the test runs left shared-memory segments behind: {left}"
