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
              earlier: Earlier | None = None) -> tuple[int, int, Earlier]:
    """(job index, job count, the array's shape to record for a later rerun). Explicit values
    win; outside an array, one job. ValueError, saying what to set, when the task fits no
    job."""
    task = _env_int("SLURM_ARRAY_TASK_ID")
    shape = Earlier(1)
    if task is not None:
        shape = Earlier(_env_int("SLURM_ARRAY_TASK_COUNT") or 1,
                        _env_int("SLURM_ARRAY_TASK_MIN") or 0,
                        _env_int("SLURM_ARRAY_TASK_STEP") or 1)
        if earlier is not None and shape.count < earlier.count:
            shape = earlier  # some tasks of the earlier array, run again
    count = num_jobs if num_jobs is not None else shape.count
    if job_index is not None:
        index = job_index
    elif task is None:
        index = 0
    else:
        index, off = divmod(task - shape.first, shape.step)
        if off:
            raise ValueError(f"Slurm array task {task} is not in the array {shape.first}.."
                             f"{shape.first + shape.step * (shape.count - 1)} step {shape.step}; "
                             "set --job-index and --num-jobs")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"job index {index} is not in [0, {count})"
                         + (f" (Slurm array task {task} of an array of {shape.count} from "
                            f"{shape.first}); set --job-index and --num-jobs"
                            if task is not None else ""))
    return index, count, Earlier(count, shape.first, shape.step)
