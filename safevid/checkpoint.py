"""Checkpoints that cannot lie: complete on every rank, or ignored.

Layout of `checkpoints/step_<8 digits>/`: DeepSpeed's engine files, `rng_rank<r>.json` (each
rank), `trainer_state.json` (step, data position, world size, config, code version) and last
`COMPLETE`, written by rank 0 only after a barrier that every rank reaches once its own files
are written. A directory without `COMPLETE` is a torn write and never resumed from.

Resume takes the newest complete checkpoint by step number (not DeepSpeed's `latest` file,
which is kept only for DeepSpeed's own tools and written through a rename). Checkpoints
present but none usable is an error: starting again from step 0 would quietly throw away the
run. A checkpoint written with another world size is converted once to DeepSpeed's universal
format (`step_<n>_universal/`) and loaded from there. JSON, not pickle, for our own files:
checkpoints travel between machines and users.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from safevid.atomic import write_text_atomic
from safevid.lifecycle import fault_delay

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
UNIVERSAL_SUFFIX = "_universal"
# Keys that may differ between a checkpoint and the run resuming it: where things go, how long
# the run is, how often it saves and evaluates, and speed switches that leave the numbers alone
# (each proven equal by the equivalence tests). Any other difference is a different run.
MAY_DIFFER = (
    "output_dir", "demo.", "train.save_every", "train.keep_checkpoints",
    "train.eval_every", "train.collective_timeout_s", "train.export_hf", "train.fused_logprobs",
    "train.gradient_checkpointing", "train.micro_batch_pairs", "train.deepspeed_config",
    "data.packing", "data.shared_prefix", "data.max_tokens_per_row", "model.attention",
    "data.decode_threads", "data.eval_shards", "data.eval_max_pairs",
    # Where a run starts from and what it reports, and the reference's source (precomputed
    # log-probs equal the live reference's; tests/test_reference.py).
    "train.resume_from", "train.export_every", "train.report_to", "train.reference",
    "train.ref_logps_dir",
)


class CheckpointError(RuntimeError):
    """Checkpoints exist but cannot be used; the message says what to change."""


@dataclass
class ResumePoint:
    """Where a run resumes: a complete checkpoint and what it recorded."""

    path: Path
    step: int
    position: tuple[int, int]
    world_size: int

    @property
    def universal_path(self) -> Path:
        return self.path.with_name(self.path.name + UNIVERSAL_SUFFIX)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if (m := TAG_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file() and (tag_dir / STATE).is_file()


def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the package version."""
    from safevid import __version__
    from safevid.config import REPO_ROOT

    if (REPO_ROOT / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty",
                                  "--tags"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return f"{__version__}+git.{out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return __version__


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _defaults() -> dict[str, object]:
    from omegaconf import OmegaConf

    from safevid.config import Config

    return _flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint value -> this run's value' for each key that must not change."""
    a, b = _flatten(saved), _flatten(current)
    # A longer or shorter run is the same run only when the learning rate does not depend on
    # its length: cosine and linear decay are stretched by train.max_steps.
    may_differ = MAY_DIFFER + (("train.max_steps", "train.epochs")
                               if a.get("train.lr_schedule") == "constant" else ())
    defaults = _defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in may_differ):
            continue
        # A key added to the schema since the checkpoint was written, at its default, is the
        # behaviour the checkpoint's run had.
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def find_resume(ckpt_dir: Path, config: dict) -> ResumePoint | None:
    """The newest complete checkpoint, or None for a fresh run.

    Raises CheckpointError when checkpoints exist but none is complete, or when the newest
    complete one was written by a run with a different configuration.
    """
    tags = _tags(ckpt_dir)
    complete = [(step, path) for step, path in tags if is_complete(path)]
    if not complete:
        leftovers = [p.name for _, p in tags] + [n for n in ("latest",) if (ckpt_dir / n).exists()]
        if leftovers:
            raise CheckpointError(
                f"{ckpt_dir} holds checkpoints but none is complete ({', '.join(leftovers)}: no "
                f"{COMPLETE} marker, so each was cut off while being written). Refusing to start "
                f"again from step 0 over them: delete {ckpt_dir} to start afresh, or point "
                "output_dir at a new directory.")
        return None
    return _check_point(complete[-1][1], config)


def _check_point(path: Path, config: dict) -> ResumePoint:
    state = json.loads((path / STATE).read_text())
    diffs = config_differences(state.get("config", {}), config)
    if diffs:
        raise CheckpointError(
            f"{path} was written by a run with a different configuration; these keys differ "
            f"(checkpoint -> this run): {'; '.join(diffs)}. Set them back to resume, or use a new "
            "output_dir for a new run.")
    return ResumePoint(path, int(state["step"]), tuple(state["data_position"]),
                       int(state["world_size"]))


def find_named(path: Path, config: dict) -> ResumePoint:
    """`train.resume_from`: a `step_<n>` directory, or the newest complete checkpoint of a run
    directory or a checkpoints directory."""
    if not path.exists():
        raise CheckpointError(f"train.resume_from={path}: no such file or directory")
    if TAG_RE.match(path.name) or (path / STATE).is_file():
        if not is_complete(path):
            raise CheckpointError(f"train.resume_from={path}: not a complete checkpoint (no "
                                  f"{COMPLETE} marker: it was cut off while being written)")
        # The same checks as for a run's own checkpoints, on a directory holding only it.
        return _check_point(path, config)
    for candidate in (path / "checkpoints", path):
        if _tags(candidate):
            point = find_resume(candidate, config)
            if point is not None:
                return point
    raise CheckpointError(f"train.resume_from={path}: holds no complete checkpoint (step_<n> "
                          "directories with a COMPLETE marker)")


def decide_resume(ckpt_dir: Path, config: dict, rank: int,
                  resume_from: str = "") -> ResumePoint | None:
    """`find_resume` on rank 0, its answer (or its error) broadcast to every rank. The run's
    own checkpoints come first: a job requeued after it saved must go on from there, not from
    `resume_from` again.

    Every rank must take the same decision: a shared file system can show ranks different
    directory listings for a moment, and one rank resuming while another starts afresh would
    hang both.
    """
    from safevid.distributed import from_first_rank

    def decide() -> ResumePoint | None:
        try:
            point = find_resume(ckpt_dir, config)
            if point is None and resume_from:
                point = find_named(Path(resume_from), config)
            return point
        except (OSError, ValueError, KeyError, TypeError) as exc:  # an unreadable trainer_state
            raise CheckpointError(f"{ckpt_dir}: a checkpoint's {STATE} cannot be read "
                                  f"({type(exc).__name__}: {exc})") from exc

    return from_first_rank(decide, rank, CheckpointError)


def convert_to_universal(point: ResumePoint) -> Path:
    """DeepSpeed's universal checkpoint of `point`, made once (rank 0) beside it."""
    out = point.universal_path
    if (out / COMPLETE).is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: a ZeRO-1/2 checkpoint must carry `universal_checkpoint_info`
    # (Megatron-DeepSpeed saves it as client state; we save none), or the converter refuses it.
    # The flag adds only its version key, all that a model without tensor or pipeline
    # parallelism needs; ZeRO-3 checkpoints never read it.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
           "--input_folder", str(point.path), "--output_folder", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(
            f"could not convert {point.path} (world size {point.world_size}) to a universal "
            f"checkpoint for this world size:\n{proc.stderr[-3000:]}")
    for name in (STATE, *[p.name for p in point.path.glob("rng_rank*.json")]):
        shutil.copy2(point.path / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    (point.path.parent / "latest_universal").unlink(missing_ok=True)  # names the tmp folder
    write_text_atomic(out / COMPLETE, json.dumps({"step": point.step, "from": point.path.name}))
    return out


def prepare_universal(point: ResumePoint, world: int, rank: int) -> None:
    """The universal copy of `point` made on rank 0; a failure there is raised on every rank
    (one rank raising while the others wait at a barrier would hang the job)."""
    from safevid.distributed import from_first_rank

    def convert() -> None:
        print(f"safevid: {point.path.name} was written by {point.world_size} ranks; converting "
              f"it to a universal checkpoint for {world}", file=sys.stderr)
        convert_to_universal(point)

    from_first_rank(convert, rank, CheckpointError)


def _rng_state() -> dict:
    # The rank's own device only: a resume may see another number of GPUs per node.
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if not torch.cuda.is_available():
        return
    mine = state.get("cuda_device")
    if mine is None and state.get("cuda"):  # written with every visible device's state
        index = torch.cuda.current_device()
        mine = state["cuda"][index] if index < len(state["cuda"]) else None
    if mine is not None:
        torch.cuda.set_rng_state(torch.tensor(mine, dtype=torch.uint8))


def save(engine, ckpt_dir: Path, step: int, position: tuple[int, int], rank: int, world: int,
         keep: int, config: dict) -> Path:
    """Write checkpoint `step` on every rank; it counts once rank 0 has written COMPLETE."""
    import torch.distributed as dist

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        # A leftover of an earlier attempt at this step must not look complete while the
        # files underneath it are being replaced.
        (tag_dir / COMPLETE).unlink(missing_ok=True)
    dist.barrier()
    write_text_atomic(tag_dir / f"rng_rank{rank}.json", json.dumps(_rng_state()))
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    if rank == 0:
        state = {"step": step, "data_position": list(position), "world_size": world,
                 "code_version": code_version(), "config": config}
        write_text_atomic(tag_dir / STATE, json.dumps(state, indent=1))
    fault_delay("checkpoint")
    dist.barrier()  # every rank has written its part
    if rank == 0:
        write_text_atomic(tag_dir / COMPLETE, json.dumps({"step": step, "world_size": world}))
        write_text_atomic(ckpt_dir / "latest", tag)
        rotate(ckpt_dir, keep)
    return tag_dir


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints by step number; drop torn ones."""
    tags = _tags(ckpt_dir)
    complete = [p for _, p in tags if is_complete(p)]
    doomed = [p for _, p in tags if not is_complete(p)]
    if keep > 0:
        doomed += complete[:-keep]
    for path in doomed:
        shutil.rmtree(path.with_name(path.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)


def load(engine, point: ResumePoint, rank: int) -> tuple[int, tuple[int, int]]:
    """Restore engine, optimizer, scheduler and RNG from `point`; return (step, data position)."""
    universal = engine.load_universal_checkpoint()
    source = point.universal_path if universal else point.path
    # ZeRO-3 writes per-rank model states, stages 0-2 one mp_rank file; DeepSpeed meets the
    # other stage's layout (universal copies included) with a bare AssertionError.
    stage = engine.zero_optimization_stage()

    def check_stage() -> None:  # on rank 0 for all: ranks may list a shared directory unalike
        if not any(source.glob("zero_pp_rank_*_model_states.pt" if stage == 3
                               else "mp_rank_*_model_states.pt")):
            raise CheckpointError(
                f"{point.path} was written under ZeRO stage {'0-2' if stage == 3 else '3'} and "
                f"this run uses stage {stage}: DeepSpeed cannot load a checkpoint across ZeRO "
                "stages. Set train.deepspeed_config back to resume, or use a new output_dir.")

    from safevid.distributed import from_first_rank

    from_first_rank(check_stage, rank, CheckpointError)
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if path is None:
        raise CheckpointError(f"{source}: DeepSpeed could not load this checkpoint")
    rng_file = source / f"rng_rank{rank}.json"
    if rng_file.is_file() and not universal:
        _set_rng_state(json.loads(rng_file.read_text()))
    return point.step, point.position
