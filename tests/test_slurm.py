"""`sbatch slurm/train_dpo.sh` on a real 2-node Slurm cluster (munged, slurmctld, two slurmd on
127.0.0.1, started and stopped by tests/slurm_local.py; slurm-wlm and munge are installed with
apt-get when missing).

Features covered: a 2-node job (one CPU rank per node) reproduces a local 2-process run;
preemption (`scancel --signal=USR1 --batch`): checkpoint, `scontrol requeue`, resume, and the
same losses as the uninterrupted run with every step logged once; a job without GPUs is refused
unless NPROC_PER_NODE asks for CPU processes; the DeepSpeed hostfile for the job's nodes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import LIFE, REPO, child_env, rows
from tests.test_lifecycle import assert_reproduces

# The script asks for GPUs and 32 cores per node; these nodes have neither.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.slurm_local import SlurmCluster, ensure_slurm_installed

    ensure_slurm_installed()
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=1) as c:
        yield c


def _job_env(**extra: str) -> dict[str, str]:
    # One CPU rank per node on purpose; the node names do not resolve, so rendezvous on loopback.
    env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "SBATCH_"))}
    return {**env, "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "PYTHON": sys.executable,
            **extra}


def _submit(cluster, log: Path, out: Path, assets: Path, env: dict[str, str],
            nodes: int = 2) -> int:
    return cluster.sbatch(
        ["-N", str(nodes), *CPU_JOB, f"--output={log}", f"--error={log}", "slurm/train_dpo.sh",
         "configs/demo.yaml", f"output_dir={out}", f"demo.assets_dir={assets}", *LIFE],
        cwd=REPO, extra_env=env)


def _log(path: Path) -> str:
    return path.read_text() if path.is_file() else "(no log)"


def test_two_node_job_matches_a_local_two_process_run(cluster, demo_assets, life_baseline,
                                                      tmp_path):
    log, out = tmp_path / "job.log", tmp_path / "run"
    job = _submit(cluster, log, out, demo_assets, _job_env())
    assert cluster.wait(job, timeout=900) == "COMPLETED", _log(log)[-4000:]
    assert "world 2" in _log(log)
    assert_reproduces(out, life_baseline)


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, demo_assets, life_baseline,
                                                        tmp_path):
    log, out = tmp_path / "job.log", tmp_path / "run"
    # Steps held for 1 s each, so that the warning surely lands mid-run.
    job = _submit(cluster, log, out, demo_assets, _job_env(SAFEVID_TEST_DELAY="step=1"))
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").is_file() and len(rows(out)) >= 2):
        assert time.monotonic() < deadline and cluster.state(job) in ("PENDING", "RUNNING"), \
            _log(log)[-4000:]
        time.sleep(0.2)
    cluster.signal(job, "USR1", batch_only=True)  # what --signal=B:USR1@300 does
    assert cluster.wait(job, timeout=900) == "COMPLETED", _log(log)[-4000:]
    text = _log(log)
    assert int(cluster.job_info(job)["Restarts"]) == 1, text[-4000:]
    assert f"requeued Slurm job {job}" in text and "resuming from step" in text
    assert_reproduces(out, life_baseline)


def test_job_without_gpus_is_refused_and_hostfile_lists_the_nodes(cluster, tmp_path):
    log, out = tmp_path / "job.log", tmp_path / "run"
    env = _job_env()
    env.pop("NPROC_PER_NODE")
    job = cluster.sbatch(["-N", "1", *CPU_JOB, f"--output={log}", f"--error={log}", "slurm/train_dpo.sh",
                          "configs/demo.yaml", f"output_dir={out}"], cwd=REPO, extra_env=env)
    assert cluster.wait(job, timeout=300) == "FAILED"
    assert "no GPU is visible" in _log(log) and "--gpus-per-node" in _log(log)
    assert not out.exists()

    hostfile = tmp_path / "hostfile"
    job = cluster.sbatch(["-N", "2", *CPU_JOB, f"--output={log}", f"--error={log}", "--wrap",
                          f"{sys.executable} -m safevid.launcher --nproc-per-node 1 "
                          f"--write-hostfile {hostfile}"], cwd=REPO, extra_env=_job_env())
    assert cluster.wait(job, timeout=300) == "COMPLETED", _log(log)
    assert hostfile.read_text() == "".join(f"{n} slots=1\n" for n in cluster.node_names)


def test_prepare_job_array_merges_once_every_task_is_done(cluster, tmp_path):
    """`sbatch --array=0-1 slurm/prepare_shards.sh ...`: each task writes its own shards, the
    first queues the merge behind the array, and the result is the single-job result."""
    from safevid.data_prep.prepare import main as prepare_main

    from tests.test_prepare import _many, _members, _pairs_file

    videos, rows = _many(tmp_path, n=5)
    pairs = _pairs_file(tmp_path / "pairs.jsonl", rows)
    args = ["--videos", str(videos), "--pairs", str(pairs), "--frames", "4", "--size", "32",
            "--videos-per-shard", "1", "--no-progress"]
    single, array = tmp_path / "single", tmp_path / "array"
    assert prepare_main([*args, "--out", str(single), "--workers", "1"]) == 0
    log = tmp_path / "prepare-%a.log"
    cluster.sbatch(["--array=0-1", *CPU_JOB, f"--output={log}", f"--error={log}",
                    "slurm/prepare_shards.sh", *args, "--out", str(array)],
                   cwd=REPO, extra_env=_job_env())
    deadline = time.monotonic() + 300
    while not (array / "index.json").is_file():
        logs = "".join(_log(p) for p in sorted(tmp_path.glob("*.log")))
        assert time.monotonic() < deadline, f"no merge in time:\n{logs[-3000:]}\n{cluster.log()}"
        time.sleep(0.25)
    assert _members(array) == _members(single)
    assert json.loads((array / "index.json").read_text())["totals"] == \
        json.loads((single / "index.json").read_text())["totals"]
    assert list(array.glob("slurm-prepare-merge-*.out"))  # the merge's log beside the shards
    assert not list(REPO.glob("slurm-*prepare*.out"))
    # Task 0 did shards 0, 2, 4 and task 1 shards 1, 3, each recorded by its task.
    assert sorted(p.name for p in (array / ".parts").glob("job-*.json")) == \
        ["job-0-of-2.json", "job-1-of-2.json"]
