"""This node's processes: how many, on which devices, with which environment.

All visible GPUs when there are GPUs, else `NPROC_PER_NODE` CPU processes (default 2) talking
over gloo. Under Slurm a node without a visible GPU is refused unless `NPROC_PER_NODE` says that
CPU processes are meant: a cluster that hands out GPUs only on request would otherwise train a
7B model in fp32 on two CPU processes without a word.
"""

from __future__ import annotations

import os
import sys

from safevid.launcher.cluster import LaunchError

DEFAULT_CPU_PROCS = 2


def local_devices(nproc: int | None, under_slurm: bool) -> list[str]:
    """Device ids of this node's processes (one process each)."""
    import torch

    gpus = torch.cuda.device_count()
    nproc = nproc or (int(os.environ["NPROC_PER_NODE"]) if os.environ.get("NPROC_PER_NODE") else None)
    if gpus == 0:
        if nproc is None and under_slurm:
            raise LaunchError(
                "no GPU is visible on this node of Slurm job "
                f"{os.environ.get('SLURM_JOB_ID', '?')}. Request GPUs with `#SBATCH "
                "--gpus-per-node=N` in slurm/train_dpo.sh (or `sbatch --gpus-per-node=N ...`); "
                "to run CPU processes on purpose, set NPROC_PER_NODE=K.")
        return [str(i) for i in range(nproc or DEFAULT_CPU_PROCS)]
    # Keep the devices Slurm (or the user) made visible: the DeepSpeed launcher rewrites
    # CUDA_VISIBLE_DEVICES from these ids, and 0..n-1 would be the wrong GPUs on a shared node.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    nproc = nproc or len(ids)
    if nproc > len(ids):
        raise LaunchError(f"{nproc} processes asked for on a node with {len(ids)} visible GPUs")
    return ids[:nproc]


def launch_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Processes share the cores: without this each one starts a thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONFAULTHANDLER", "1")
    return env


def launch_command(args: list[str], nproc: int | None = None,
                   command: str = "train") -> tuple[list[str], dict]:
    """`safevid.launcher` for this machine alone (the demo and the tests use it)."""
    cmd = [sys.executable, "-m", "safevid.launcher", "--command", command]
    if nproc:
        cmd += ["--nproc-per-node", str(nproc)]
    return [*cmd, *args], launch_env(nproc or DEFAULT_CPU_PROCS)


def cpu_job_env() -> dict[str, str]:
    """This process's environment for a job of CPU ranks started from it (tests, benchmarks):
    one thread per rank, since the ranks share the cores, and none of this process's own
    rank variables, which would make the child join some other process group."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
