"""Launch `safevid train` on this node through the DeepSpeed launcher.

All local GPUs when there are GPUs, else `NPROC_PER_NODE` CPU processes (default 2) talking
over gloo. Multi-node Slurm launch builds on this (one such launcher per node).
"""

from __future__ import annotations

import os
import sys

from safevid.distributed import free_port


def num_processes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return int(os.environ.get("NPROC_PER_NODE", "2"))


def launch_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Processes share the cores: without this each one starts a thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch_command(train_args: list[str], nproc: int | None = None) -> tuple[list[str], dict]:
    nproc = nproc or num_processes()
    port = os.environ.get("MASTER_PORT") or str(free_port())
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--num_gpus", str(nproc), "--master_port", port, "--no_local_rank", "--log_level=warning",
        "--module", "safevid", "train", *train_args,
    ]
    return cmd, launch_env(nproc)
