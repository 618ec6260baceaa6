"""Where this node stands in a job: node count and rank, rendezvous address and port, hosts.

Under Slurm it comes from the job's environment (one launcher per node, started by srun);
anywhere else from plain flags, so that two launchers on one machine act as two nodes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from safevid.atomic import write_text_atomic


class LaunchError(RuntimeError):
    """The launch cannot go ahead; the message says what to change."""


@dataclass
class NodeSpec:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    hosts: list[str]  # one name per node, in node-rank order

    def world_info(self, local_ids: list) -> str:
        """DeepSpeed's `--world_info`: every node's device ids, base64 JSON in node order.

        Every node has the same number of processes (homogeneous jobs); global ranks follow
        node order, so node k holds ranks k*n .. k*n+n-1.
        """
        info = {host: list(local_ids) for host in self.hosts}
        return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list (`gpu[01-04,07]`) -> host names, through scontrol."""
    try:
        proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                              text=True)
    except FileNotFoundError as exc:
        raise LaunchError("scontrol is not on PATH: run inside a Slurm job, or pass --nnodes, "
                          "--node-rank and --master-addr") from exc
    if proc.returncode != 0:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def port_for_job(job_id: str) -> int:
    """A rendezvous port derived from the job id: the same on every node of the job (and again
    after a requeue) without any exchange, and different for jobs that share a node."""
    return 20000 + int(job_id) % 40000


def from_slurm(env: dict[str, str] | None = None) -> NodeSpec:
    env = dict(os.environ if env is None else env)
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    nnodes = int(env.get("SLURM_NNODES", len(hosts)))
    if nnodes != len(hosts):
        raise LaunchError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST has {len(hosts)} hosts")
    job_id = env.get("SLURM_JOB_ID", "0")
    return NodeSpec(
        nnodes=nnodes,
        node_rank=int(env.get("SLURM_NODEID", "0")),
        # The first host of the allocation hosts the rendezvous; MASTER_ADDR overrides it
        # (for a cluster whose node names do not resolve on its own network).
        master_addr=env.get("MASTER_ADDR") or hosts[0],
        master_port=int(env.get("MASTER_PORT") or port_for_job(job_id)),
        hosts=hosts,
    )


def from_flags(nnodes: int, node_rank: int, master_addr: str, master_port: int | None) -> NodeSpec:
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} (--nnodes {nnodes})")
    if nnodes > 1 and master_port is None:
        raise LaunchError("--master-port is required with --nnodes > 1: every node must use the "
                          "same port")
    from safevid.distributed import free_port

    return NodeSpec(nnodes, node_rank, master_addr, master_port or free_port(),
                    [f"node{i}" for i in range(nnodes)])


def write_hostfile(path: str | Path, hosts: list[str], slots: int) -> Path:
    """A DeepSpeed hostfile (`host slots=N` per line) for `deepspeed --hostfile`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(f"{h} slots={slots}\n" for h in hosts))
    return path
