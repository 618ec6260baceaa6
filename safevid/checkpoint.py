"""Checkpoints: DeepSpeed engine state plus our own step, data position and RNG state.

Layout: `checkpoints/<tag>/` is DeepSpeed's, plus `trainer_state.json` (rank 0) and
`rng_rank<r>.json` (each rank). DeepSpeed writes `checkpoints/latest` only once a save has
completed, so a process killed mid-save resumes from the previous checkpoint. Our files are
written before the engine's, for the same reason. JSON, not pickle: checkpoints may travel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save(engine, ckpt_dir: Path, step: int, position: tuple[int, int], rank: int, keep: int) -> None:
    import torch.distributed as dist

    tag = f"step_{step:08d}"
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    if rank == 0:
        state = {"step": step, "data_position": list(position)}
        (tag_dir / "trainer_state.json").write_text(json.dumps(state))
    engine.save_checkpoint(str(ckpt_dir), tag=tag)
    dist.barrier()
    if rank == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag / "trainer_state.json").is_file() else None


def load(engine, ckpt_dir: Path, rank: int) -> tuple[int, tuple[int, int]] | None:
    """Restore engine, optimizer, scheduler and RNG; return (step, data position) or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    state = json.loads((ckpt_dir / tag / "trainer_state.json").read_text())
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.json"
    if rng_file.is_file():
        _set_rng_state(json.loads(rng_file.read_text()))
    return state["step"], tuple(state["data_position"])
