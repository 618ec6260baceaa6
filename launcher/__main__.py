"""`python -m safevid.launcher [flags] [CONFIG] [key=value ...]`: one launcher per node.

Under Slurm (srun, one task per node) the node's place in the job comes from the job's
environment; elsewhere from `--nnodes --node-rank --master-addr --master-port`, so two launchers
on one machine act as two nodes. Each launcher starts one `safevid train` per device through
DeepSpeed's per-node launcher, which sets RANK/LOCAL_RANK/WORLD_SIZE and ends the node's other
ranks when one fails.

It also: removes shared-memory segments that killed runs left behind; forwards SIGUSR1/SIGTERM
to the ranks (they checkpoint and stop at the next step boundary); names the node when its
ranks fail; and on the first node, when the run stopped on such a signal, requeues the Slurm
job (`scontrol requeue`), which then resumes from that checkpoint by itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from safevid.launcher.cluster import LaunchError, NodeSpec, from_flags, from_slurm, write_hostfile
from safevid.launcher.local import launch_env, local_devices

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m safevid.launcher", description=__doc__.splitlines()[0],
        epilog="After these flags: the command's own arguments (for train: CONFIG key=value ...; "
               "for eval: the options of `safevid eval`).")
    p.add_argument("--nnodes", type=int, default=None, help="nodes in the job (not under Slurm)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index (not under Slurm)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rendezvous host (not under Slurm)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes on this node (default: visible GPUs, else NPROC_PER_NODE or 2)")
    p.add_argument("--command", choices=("train", "precompute-ref", "eval"), default="train",
                   help="what each process runs: `safevid train` (default), `safevid "
                        "precompute-ref` or `safevid eval`")
    p.add_argument("--write-hostfile", metavar="PATH", default=None,
                   help="write a DeepSpeed hostfile for this job's nodes and exit")
    # The launcher's own flags come first; everything from the first other word on belongs to
    # the command (`safevid eval` takes --options of its own, which argparse would claim).
    own = {a for action in p._actions for a in action.option_strings}
    i = 0
    while i < len(argv) and argv[i].split("=", 1)[0] in own:
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    args = p.parse_args(argv[:i])
    args.train_args = argv[i:]
    return args


def placed_by_slurm(args: argparse.Namespace) -> bool:
    """Inside a Slurm job and not told otherwise by flags."""
    return args.nnodes is None and bool(os.environ.get("SLURM_JOB_ID")) \
        and bool(os.environ.get("SLURM_JOB_NODELIST"))


def node_spec(args: argparse.Namespace, under_slurm: bool) -> NodeSpec:
    if under_slurm:
        return from_slurm()
    return from_flags(args.nnodes or 1, args.node_rank, args.master_addr, args.master_port)


def deepspeed_command(spec: NodeSpec, ids: list[str], args: list[str],
                      command: str = "train") -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={spec.world_info(ids)}",
        f"--node_rank={spec.node_rank}", f"--master_addr={spec.master_addr}",
        f"--master_port={spec.master_port}", "--no_local_rank", "--log_level=warning",
        "--module", "safevid", command, *args,
    ]


def _output_dir(train_args: list[str]):
    from pathlib import Path

    from safevid.config import load_config
    from safevid.train import parse_args as train_parse_args

    config, overrides = train_parse_args(train_args)
    return Path(load_config(config, overrides).output_dir)


def run_node(cmd: list[str], env: dict[str, str], wanted: list[int]) -> int:
    """Run the node's DeepSpeed launcher; pass stop signals on to its ranks until they end.

    The signals go to the ranks, not to DeepSpeed's launcher, which would kill them on SIGTERM
    and die of SIGUSR1. A rank that has not yet installed its handler ignores SIGUSR1 (the
    ignore is inherited from here), so the signal is sent again every 0.5 s until the run ends.
    """
    import psutil

    def note(signum, frame) -> None:
        if signum not in wanted:
            wanted.append(signum)

    def ignore_in_child() -> None:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)

    for sig in FORWARDED:
        signal.signal(sig, note)
    child = subprocess.Popen(cmd, env=env, preexec_fn=ignore_in_child)
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        try:
            ranks = psutil.Process(child.pid).children()
        except psutil.Error:
            ranks = []
        for rank in ranks:
            for sig in wanted:
                try:
                    rank.send_signal(sig)
                except psutil.Error:
                    pass  # it ended meanwhile


def requeue_if_stopped(train_args: list[str], since: float, under_slurm: bool) -> None:
    from safevid.lifecycle import read_stop_file

    record = read_stop_file(_output_dir(train_args), since)
    if record is None:
        return
    what = f"the run stopped after step {record['step']} on {record['reason']} with a checkpoint"
    job = os.environ.get("SLURM_JOB_ID")
    if not under_slurm or not job:
        print(f"safevid launcher: {what}; run the same command again to resume.", file=sys.stderr)
        return
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode == 0:
        print(f"safevid launcher: {what}; requeued Slurm job {job}: it resumes from that "
              "checkpoint when it starts again.", file=sys.stderr, flush=True)
    else:
        print(f"safevid launcher: {what}; could not requeue Slurm job {job} (scontrol: "
              f"{(proc.stderr or proc.stdout).strip()}); submit the same command again to resume.",
              file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    # A stop signal that comes before the ranks run is kept (its default action would kill the
    # launcher without a word) and delivered to them once they exist.
    early: list[int] = []
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, frame: early.append(signum))
    args = parse_args(argv)
    under_slurm = placed_by_slurm(args)
    try:
        ids = local_devices(args.nproc_per_node, under_slurm)
        spec = node_spec(args, under_slurm)
        if args.write_hostfile:
            print(write_hostfile(args.write_hostfile, spec.hosts, len(ids)))
            return 0
    except LaunchError as exc:
        print(f"safevid launcher: {exc}", file=sys.stderr)
        return 2
    from safevid.distributed import sweep_stale_shm

    for path in sweep_stale_shm():
        print(f"safevid launcher: removed {path}, left behind by a killed run", file=sys.stderr)
    started = time.time()
    rc = run_node(deepspeed_command(spec, ids, args.train_args, args.command),
                  launch_env(len(ids)), early)
    if rc != 0:
        what = "training" if args.command == "train" else f"safevid {args.command}"
        print(f"safevid launcher: node {spec.node_rank} ({socket.gethostname()}, ranks "
              f"{spec.node_rank * len(ids)}..{spec.node_rank * len(ids) + len(ids) - 1}): "
              f"{what} failed with exit code {rc}", file=sys.stderr, flush=True)
        return rc
    if spec.node_rank == 0 and args.command == "train":
        requeue_if_stopped(args.train_args, started, under_slurm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
