"""How a run stops early: a signal asks, all ranks agree at a step boundary, nobody races.

Slurm warns a job before its time limit or a preemption with a signal (`--signal=B:USR1@N`,
forwarded to every rank), and ends it with SIGTERM. A rank that receives either only notes
it; at the next step boundary one all-reduce tells every rank whether any rank was asked, so
all of them write the same checkpoint and stop after the same step. Deciding on one rank
alone would leave the others waiting in a ZeRO-3 gather.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from safevid.atomic import write_text_atomic

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Written by rank 0 when a run stopped on request with a checkpoint; the launcher on the first
# node reads it to requeue the Slurm job.
STOP_FILE = "stopped.json"


class StopRequest:
    """Notes SIGUSR1/SIGTERM; `agreed()` is the collective decision at a step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            # os.write, not print: a handler that prints while the interrupted code is writing
            # to stderr fails with a reentrant-call error and would kill the rank.
            os.write(2, f"safevid: rank {os.environ.get('RANK', '0')} received "
                        f"{self.signal_name}: stopping with a checkpoint after the current "
                        "step\n".encode())

    def agreed(self, device) -> str | None:
        """The signal's name on every rank if any rank was asked to stop, else None."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if self.signal_name is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        return self.signal_name or "a stop signal on another rank"


def ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def write_stop_file(out: Path, step: int, reason: str) -> None:
    write_text_atomic(out / STOP_FILE,
                      json.dumps({"step": step, "reason": reason, "time": time.time()}))


def read_stop_file(out: Path, since: float) -> dict | None:
    """The stop record of a run that stopped on request after `since` (a time.time())."""
    path = out / STOP_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("time", 0) >= since else None


def clear_stop_file(out: Path) -> None:
    (out / STOP_FILE).unlink(missing_ok=True)


def fault_delay(phase: str) -> None:
    """Fault injection for the test suite: `SAFEVID_TEST_DELAY="checkpoint=3,eval=3"` holds the
    named phase for that many seconds, announced on stderr, so that a test can deliver a signal
    or a kill inside it deterministically. Unset in normal runs."""
    spec = os.environ.get("SAFEVID_TEST_DELAY", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, seconds = item.partition("=")
        if name == phase:
            print(f"safevid: test delay: rank {os.environ.get('RANK', '0')} in {phase} for "
                  f"{seconds}s", file=sys.stderr, flush=True)
            time.sleep(float(seconds))
