"""A real, private Slurm cluster on 127.0.0.1 for tests.

Usage::

    from tests.slurm_local import SlurmCluster, ensure_slurm_installed

    ensure_slurm_installed()                 # apt-get installs slurm-wlm + munge if missing
    with SlurmCluster(tmp_path / "slurm", nodes=2, cpus_per_node=1) as cluster:
        job = cluster.sbatch(["-N", "2", "--output", str(out), "job.sh"], cwd=tmp_path)
        assert cluster.wait(job, timeout=120) == "COMPLETED"
        print(cluster.job_info(job)["Restarts"])
        subprocess.run(["squeue"], env=cluster.env)   # any Slurm client command

The cluster runs its own munged (private key and socket), one slurmctld and one slurmd per node
(all nodes are this host, told apart by port), all as root, with every state, spool, log and pid
file under ``workdir``. ``SLURM_CONF`` in ``cluster.env`` selects it, so it never touches a system
Slurm or munge. Leaving the ``with`` block cancels its jobs and stops exactly the processes it
started. A requeued job starts again about ``REQUEUE_DELAY_S`` seconds after its old run has
ended (see ``CRED_EXPIRE_S``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# A requeued job may not start before its old launch credential has expired on the nodes: Slurm
# sets its BeginTime to requeue time + cred_expire + 1 (default cred_expire 120 s). 5 s is the
# smallest value Slurm accepts (smaller ones are rejected and silently become 120). Nothing wakes
# the scheduler when BeginTime passes, so without a short sched_interval/bf_interval the job waits
# for the next backfill cycle (~30 s).
CRED_EXPIRE_S = 5
SCHED_INTERVAL_S = 1
REQUEUE_DELAY_S = CRED_EXPIRE_S + SCHED_INTERVAL_S + 1

FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE",
})

# Unix socket paths (munge socket, slurmstepd sockets in the spool dir) are limited to 107 bytes;
# a deeper workdir is reached through a short symlink in /tmp.
_MAX_ROOT_LEN = 60


class SlurmError(RuntimeError):
    """The local cluster could not be installed, started or queried."""


class JobGone(LookupError):
    """slurmctld no longer knows the job (purged after MinJobAge, or never existed)."""


def _find(prog: str) -> str | None:
    path = shutil.which(prog)
    if path:
        return path
    for d in SBIN_DIRS:
        candidate = Path(d) / prog
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, *CLIENTS) if _find(p) is None]


def ensure_slurm_installed(timeout: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get unless their programs are already present.

    Raises SlurmError when they are missing and cannot be installed (not root, no apt-get, apt
    fails); callers decide whether that is a skip or a failure.
    """
    missing = _missing_programs()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmError(f"Slurm/munge programs missing ({', '.join(missing)}) and not root, "
                         "so they cannot be installed with apt-get")
    apt = shutil.which("apt-get")
    if apt is None:
        raise SlurmError(f"Slurm/munge programs missing ({', '.join(missing)}) and no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + timeout

    def apt_run(*args: str) -> subprocess.CompletedProcess[str]:
        left = max(1.0, deadline - time.monotonic())
        try:
            return subprocess.run([apt, *args], env=env, capture_output=True, text=True,
                                  timeout=left)
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(f"apt-get {' '.join(args)} timed out after {timeout:.0f} s") from exc

    install = ("install", "-y", "--no-install-recommends", "slurm-wlm", "munge")
    lists = Path("/var/lib/apt/lists")
    have_lists = lists.is_dir() and any(lists.glob("*Packages*"))
    proc = apt_run(*install) if have_lists else None
    if proc is None or proc.returncode != 0:
        # Package lists absent or stale (e.g. a fresh CI image): refresh once, then retry.
        update = apt_run("update")
        if update.returncode != 0:
            raise SlurmError(f"apt-get update failed ({update.returncode}):\n{update.stderr[-3000:]}")
        proc = apt_run(*install)
    if proc.returncode != 0:
        raise SlurmError(f"apt-get install slurm-wlm munge failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    still = _missing_programs()
    if still:
        raise SlurmError(f"apt-get install succeeded but these are still missing: {', '.join(still)}")


def _free_ports(n: int) -> list[int]:
    # Holding every socket until all are chosen keeps the ports distinct from each other.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # If the test process is killed outright, its daemons must not outlive it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Split one `scontrol show ... -o` line into its Key=Value fields."""
    out: dict[str, str] = {}
    for part in re.split(r"\s+(?=[A-Za-z][\w:/()]*=)", line.strip()):
        key, sep, value = part.partition("=")
        if sep:
            out[key] = value
    return out


class SlurmCluster:
    """A private slurmctld + N slurmd (+ munged) on 127.0.0.1; use as a context manager."""

    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int = 1,
                 partition: str = "debug", start_timeout: float = 60.0,
                 cred_expire: int = CRED_EXPIRE_S) -> None:
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("nodes and cpus_per_node must be >= 1")
        self.workdir = Path(workdir).resolve()
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.start_timeout = start_timeout
        if cred_expire < 5:
            # Slurm rejects smaller values and silently falls back to 120 s.
            raise ValueError("cred_expire must be >= 5")
        self.cred_expire = cred_expire
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf_path: Path | None = None
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._link: Path | None = None
        self._root = self.workdir
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if self._started:
            raise SlurmError("cluster already started")
        if os.geteuid() != 0:
            raise SlurmError("the local Slurm cluster runs its daemons as root; run tests as root")
        missing = _missing_programs()
        if missing:
            raise SlurmError(f"missing programs {missing}; call ensure_slurm_installed() first")
        self._started = True
        try:
            self._prepare()
            self._start_munged()
            self._start_slurmctld()
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", [_find("slurmd") or "slurmd", "-D", "-N", name])
            self._wait_nodes_idle()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel this cluster's jobs, then stop the daemons it started (by PID)."""
        if not self._started:
            return
        self._started = False
        try:
            if self._alive("slurmctld"):
                self._cancel_all_jobs(timeout=timeout / 2)
        finally:
            # One shared deadline, so a daemon that ignores SIGTERM costs at most timeout / 2 overall.
            order = [f"slurmd-{n}" for n in self.node_names] + ["slurmctld", "munged"]
            for name in order:
                proc = self._procs.get(name)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout / 2
            for name in order:
                proc = self._procs.get(name)
                if proc is None:
                    continue
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            self._procs.clear()
            self._kill_strays()
            if self._link is not None:
                with contextlib.suppress(OSError):
                    self._link.unlink()
                self._link = None

    # ------------------------------------------------------------------ clients

    def run(self, args: list[str], cwd: Path | str | None = None,
            extra_env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster."""
        env = dict(self.env, **(extra_env or {}))
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, args: list[str], cwd: Path | str, extra_env: dict[str, str] | None = None) -> int:
        """Submit with `sbatch --parsable ARGS` and return the job id."""
        proc = self.run(["sbatch", "--parsable", *args], cwd=cwd, extra_env=extra_env)
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """Fields of `scontrol show job -o JOB` (JobState, Restarts, NodeList, ExitCode, ...)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            if "Invalid job id" in proc.stderr or not proc.stdout.strip():
                raise JobGone(f"job {job_id} unknown to slurmctld: {proc.stderr.strip()}")
            raise SlurmError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
        return parse_scontrol_record(proc.stdout.splitlines()[0])

    def state(self, job_id: int) -> str:
        """Current JobState (PENDING, RUNNING, COMPLETING, REQUEUED, COMPLETED, FAILED, ...)."""
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float = 300.0, poll: float = 0.25) -> str:
        """Block until the job reaches a final state and return it.

        Requeue passes through REQUEUED/PENDING/COMPLETING, none of which is final, so a requeued
        job is waited for through its next run. Raises TimeoutError with the last state seen.
        """
        deadline = time.monotonic() + timeout
        last = "UNKNOWN"
        while True:
            try:
                info = self.job_info(job_id)
                last = info["JobState"]
                if last in FINAL_STATES:
                    return last
            except JobGone:
                if last in FINAL_STATES:
                    return last
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {last} after {timeout:.0f} s")
            time.sleep(poll)

    def signal(self, job_id: int, sig: str = "USR1", batch_only: bool = True) -> None:
        """`scancel --signal=SIG [--batch] JOB` (batch_only signals the batch shell alone)."""
        args = ["scancel", f"--signal={sig}", *(["--batch"] if batch_only else []), str(job_id)]
        self.run(args)

    def cancel(self, job_id: int) -> None:
        self.run(["scancel", str(job_id)])

    def log(self, name: str = "slurmctld", tail: int = 4000) -> str:
        """Tail of a daemon's log: "slurmctld", "munged" or "slurmd-n1"... (for failure messages)."""
        texts = []
        for path in (self._logdir / f"{name}.log", self._logdir / f"{name}.out"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-tail:])
        return "\n".join(texts)

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items()}

    # ------------------------------------------------------------------ internals

    @property
    def _logdir(self) -> Path:
        return self._root / "log"

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if len(str(self.workdir)) > _MAX_ROOT_LEN:
            link = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
            link.rmdir()
            link.symlink_to(self.workdir, target_is_directory=True)
            self._link = self._root = link
        else:
            self._root = self.workdir
        root = self._root
        for sub in ("munge", "state", "spool", "log", "run"):
            d = root / sub
            if d.exists():
                # A previous cluster's state would resurrect its jobs and node states.
                shutil.rmtree(d)
            d.mkdir(mode=0o700)
        for name in self.node_names:
            (root / "spool" / name).mkdir(mode=0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

        ctl_port, *node_ports = _free_ports(1 + self.nodes)
        self._munge_socket = root / "munge" / "munge.sock"
        node_lines = [
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus_per_node} "
            f"Port={p} State=UNKNOWN"
            for n, p in zip(self.node_names, node_ports, strict=True)
        ]
        conf = [
            f"ClusterName=local{ctl_port}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self._munge_socket},cred_expire={self.cred_expire}",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            # Nodes share this host's hardware; more configured CPUs than it has must not drain them.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "SchedulerType=sched/backfill",
            f"SchedulerParameters=sched_interval={SCHED_INTERVAL_S},bf_interval=1",
            # Long enough that wait() sees a finished job's final state before it is purged.
            "MinJobAge=600",
            "KillWait=2",
            "InactiveLimit=0",
            "Waittime=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=10",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
            *node_lines,
            f"PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        self.conf_path = root / "slurm.conf"
        self.conf_path.write_text("\n".join(conf) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_",
                                                                          "SALLOC_", "SQUEUE_"))}
        env["SLURM_CONF"] = str(self.conf_path)
        self.env = env

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self._logdir / f"{name}.out", "wb")
        try:
            self._procs[name] = subprocess.Popen(
                args, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self._root, start_new_session=True,
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread()
                else None)
        finally:
            out.close()

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _check_alive(self, names: list[str]) -> None:
        for name in names:
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode} during start-up:\n"
                                 f"{self.log(name)}")

    def _start_munged(self) -> None:
        m = self._root / "munge"
        # --force: munged refuses to run as root and wants every directory above its socket to be
        # world-executable; neither matters for a private test daemon.
        self._spawn("munged", [
            _find("munged") or "munged", "--foreground", "--force",
            f"--socket={self._munge_socket}", f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
            f"--log-file={m / 'munged.log'}", "--num-threads=2",
        ])
        self._poll(lambda: self._munge_socket.exists() and subprocess.run(
            ["munge", "-n", "-S", str(self._munge_socket)], capture_output=True).returncode == 0,
            what="munged", names=["munged"])

    def _start_slurmctld(self) -> None:
        # -c: never recover state; -i: tolerate anything odd in the (empty) state dir.
        self._spawn("slurmctld", [_find("slurmctld") or "slurmctld", "-D", "-c", "-i"])
        self._poll(lambda: self.run(["scontrol", "ping"], check=False, timeout=10).stdout.count("UP") > 0,
                   what="slurmctld", names=["munged", "slurmctld"])

    def _wait_nodes_idle(self) -> None:
        def idle() -> bool:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            return all(states.get(n, "").rstrip("*") == "idle" for n in self.node_names)

        names = ["munged", "slurmctld", *(f"slurmd-{n}" for n in self.node_names)]
        self._poll(idle, what="nodes idle", names=names)

    def _poll(self, ok: Callable[[], bool], what: str, names: list[str]) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while True:
            self._check_alive(names)
            if ok():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in names)
                raise SlurmError(f"timed out after {self.start_timeout:.0f} s waiting for {what}\n{logs}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _cancel_all_jobs(self, timeout: float) -> None:
        proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
        jobs = proc.stdout.split()
        if not jobs:
            return
        self.run(["scancel", *jobs], check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
            if proc.returncode == 0 and not proc.stdout.split():
                return
            time.sleep(0.2)

    def _kill_strays(self) -> None:
        # slurmstepd and job tasks are detached from slurmd, so stopping slurmd can leave them
        # running; they are recognised as ours by the SLURM_CONF in their environment.
        if self.conf_path is None:
            return
        marker = f"SLURM_CONF={self.conf_path}".encode()
        protected = {os.getpid(), os.getppid()}
        strays = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in protected:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                strays.append(int(entry.name))
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
