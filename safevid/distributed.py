"""Process-group set-up and tear-down for one training process, with or without a launcher."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

# DeepSpeed's CPU back end names its shared-memory all-reduce segments
# `<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (deepspeed/ops/csrc/cpu/comm/shm.cpp).
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env() -> None:
    """Defaults for a single process started without a launcher.

    Without RANK/WORLD_SIZE DeepSpeed falls back to MPI discovery, which fails without mpi4py.
    The accelerator must be chosen before deepspeed is first imported.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    # A collective that times out on NCCL must end the process (and so the job), not leave
    # it waiting on a communicator that will never complete.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def init(timeout_s: float) -> tuple[int, int, int]:
    """(rank, world size, local rank) after joining the process group.

    Every collective, DeepSpeed's included, gives up after `timeout_s`: a dead or hung peer
    then ends this process with an error instead of a silent wait.
    """
    from datetime import timedelta

    import deepspeed
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend=backend, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _unlink_own_shm(rank)
    return rank, world, local


def _shm_name(rank: int) -> Path:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_own_shm(rank: int) -> None:
    """Remove this rank's all-reduce segment name once every local rank has mapped it.

    DeepSpeed creates the segment at init and never unlinks it, so each run left 66 MB per rank
    in /dev/shm. The mappings stay valid after the unlink, and the memory is returned when the
    last process using it exits, however it exits (SIGKILL included).
    """
    import torch
    import torch.distributed as dist

    # DeepSpeed's own condition for the shared-memory all-reduce (CPU, every rank on this
    # node), read from the environment every rank shares: a stale file of the same name must
    # not make one rank alone enter the barrier below.
    local_size = os.environ.get("LOCAL_SIZE")
    if torch.cuda.is_available() or local_size != os.environ.get("WORLD_SIZE"):
        return
    # Each rank maps its peers' segments inside init_distributed, before it returns; after
    # this barrier no rank still needs to open a segment by name.
    dist.barrier()
    _shm_name(rank).unlink(missing_ok=True)


def sweep_stale_shm(min_age_s: float = 60.0) -> list[Path]:
    """Delete this user's DeepSpeed all-reduce segments that no live process maps.

    Runs killed before they unlinked their segments (or by older versions) leave them behind;
    the launcher calls this before it starts ranks. Segments younger than `min_age_s` are kept:
    a run starting right now may have created its own and not mapped it yet.
    """
    stale = sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))
    if not stale:
        return []
    mapped = mapped_shm_names()
    removed = []
    now = time.time()
    for path in stale:
        try:
            if path.name in mapped or now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def mapped_shm_names() -> set[str]:
    """Names of the all-reduce segments that some live process has mapped."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue  # the process ended, or is not readable
        for line in text.splitlines():
            if f"/dev/shm/{SHM_PREFIX}" in line:
                names.add(line.rsplit("/", 1)[-1].removesuffix(" (deleted)"))
    return names


def shutdown() -> None:
    """Leave the process group in order, so that the process exits with its own status.

    Exiting with the group alive let gloo's threads be destroyed during interpreter teardown,
    which now and then aborted a finished rank ("terminate called without an active exception").
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def from_first_rank(fn, rank: int, error: type[Exception] | None = None):
    """`fn()` on rank 0 alone, its result broadcast to every rank; its failure, whatever it
    is (a refusal, an unreadable or malformed file), is raised on every rank as `error`
    (default ConfigError) with the same message, so all of them end alike instead of one
    raising while the others wait in the next collective."""
    import torch.distributed as dist

    from safevid.config import ConfigError

    error = error or ConfigError
    answer: list = [None]
    alone = not dist.is_initialized()  # one process without a group (tools, tests): rank 0
    if rank == 0 or alone:
        try:
            answer[0] = ("ok", fn())
        except (ConfigError, error) as exc:
            answer[0] = ("error", str(exc))
        except Exception as exc:  # noqa: BLE001  any failure must reach every rank
            answer[0] = ("error", f"{type(exc).__name__}: {exc}")
    if not alone:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise error(value)
    return value
