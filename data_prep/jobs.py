"""Which part of a split job this process does: `--job-index`/`--num-jobs`, or its place in a
Slurm job array.

An array's tasks are numbered as its `--array` says (`0-31`, `1-32`, `0-62:2`); a task's job
index is its place in that range, (task id - first id) / step, and the job count is the number
of tasks. A failed task is run again alone (`sbatch --array=7 ...`): Slurm then reports an
array of one task, so the earlier array's shape, read from the records that run left behind
(`Earlier`), decides instead, and task 7 does again what task 7 did before.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Earlier:
    """The job array an earlier run of the same output was split into."""

    count: int
    first: int = 0  # the array's first task id
    step: int = 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def array_job(job_index: int | None, num_jobs: int | None,
              earlier: Earlier | None = None) -> tuple[int, int, Earlier | None]:
    """(job index, job count, the Slurm array's shape to record for a later rerun: None when
    the split was given by hand or there is no array). Explicit values win; outside an array,
    one job. ValueError, saying what to set, when the task fits no job.

    The earlier array's shape is taken whenever Slurm reports fewer tasks than it had: tasks
    run again (`--array=7`, `--array=0-3`, `--array=3,9`). A split into another number of
    jobs needs a new output (the merge refuses mixed counts)."""
    task = _env_int("SLURM_ARRAY_TASK_ID")
    shape = None
    if task is None:
        index, count = job_index or 0, num_jobs or 1
    else:
        first = _env_int("SLURM_ARRAY_TASK_MIN")
        shape = Earlier(_env_int("SLURM_ARRAY_TASK_COUNT") or 1, task if first is None else first,
                        _env_int("SLURM_ARRAY_TASK_STEP") or 1)
        if earlier is not None and shape.count < earlier.count:
            shape = earlier
            print(f"safevid: Slurm array task {task} runs again as job "
                  f"{(task - shape.first) // shape.step} of the earlier array of "
                  f"{shape.count} (from {shape.first}, step {shape.step})", file=sys.stderr)
        index, off = divmod(task - shape.first, shape.step)
        if off and job_index is None:
            raise ValueError(f"Slurm array task {task} is not in the array of {shape.count} from "
                             f"{shape.first}, step {shape.step}; set --job-index and --num-jobs")
        count = num_jobs if num_jobs is not None else shape.count
        if job_index is None:
            shape = Earlier(count, shape.first, shape.step)
        else:
            index, shape = job_index, None  # a split given by hand: no array shape to record
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"job index {index} is not in [0, {count})"
                         + (f" (Slurm array task {task}); set --job-index and --num-jobs"
                            if task is not None else ""))
    return index, count, shape
