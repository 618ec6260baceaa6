"""How runs stop, fail, resume and clean up: real DeepSpeed processes through the launcher.

Features covered: SIGUSR1 during a step, a checkpoint write and evaluation (all ranks agree,
checkpoint, stop, exit 0; the resumed run reproduces the uninterrupted one); SIGKILL of the
whole job mid-checkpoint (resume from the previous complete one, no logged step lost); a dead
and a hung rank (non-zero exit within the collective timeout, the node named); resume on
another world size (2 -> 1, 1 -> 2) through DeepSpeed's universal checkpoint; two launchers as
two nodes; refusals (torn checkpoints only, another run's config); checkpoint bookkeeping
(`latest` empty, missing or dangling; rotation by step number); the step metrics on the step's
device; repeated runs exit 0 and leave /dev/shm clean.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    DEMO_CONFIG,
    LIFE,
    REPO,
    Running,
    child_env,
    rows,
    run_train,
    shm_segments,
    start_train,
)

# fp32 on CPU; runs that differ in world size or interruption reduce in another order only.
TOL = 1e-5


def assert_reproduces(run: Path, baseline: Path) -> None:
    """Every step logged exactly once, with the uninterrupted run's loss and grad norm."""
    got, want = rows(run), rows(baseline)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("loss", "grad_norm", "lr", "rewards/margin"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=TOL, abs=TOL), key


# ---- unit: checkpoint bookkeeping ----------------------------------------------------------

def _fake_checkpoint(ckpt: Path, step: int, complete: bool = True, config: dict | None = None,
                     world: int = 2) -> Path:
    from safevid.checkpoint import COMPLETE, STATE, tag_for

    tag = ckpt / tag_for(step)
    tag.mkdir(parents=True)
    (tag / STATE).write_text(json.dumps({"step": step, "data_position": [0, step * 16],
                                         "world_size": world, "config": config or {}}))
    if complete:
        (tag / COMPLETE).write_text("{}")
    return tag


@pytest.mark.parametrize("latest", ["missing", "empty", "dangling", "older"])
def test_resume_takes_newest_complete_checkpoint_whatever_latest_says(tmp_path, latest):
    from safevid.checkpoint import find_resume

    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 4)
    _fake_checkpoint(ckpt, 10)
    _fake_checkpoint(ckpt, 12, complete=False)  # torn: killed while being written
    text = {"empty": "", "dangling": "step_00000099", "older": "step_00000004"}.get(latest)
    if text is not None:
        (ckpt / "latest").write_text(text)
    point = find_resume(ckpt, {})
    assert point.step == 10 and point.position == (0, 160) and point.world_size == 2


def test_torn_checkpoints_only_are_refused_not_restarted(tmp_path):
    from safevid.checkpoint import CheckpointError, find_resume

    ckpt = tmp_path / "checkpoints"
    assert find_resume(ckpt, {}) is None  # nothing there: a fresh run
    _fake_checkpoint(ckpt, 2, complete=False)
    with pytest.raises(CheckpointError, match="none is complete.*step_00000002"):
        find_resume(ckpt, {})
    (ckpt / "step_00000002").rename(ckpt / "unrelated")
    (ckpt / "latest").write_text("")
    with pytest.raises(CheckpointError, match="none is complete.*latest"):
        find_resume(ckpt, {})


def test_another_runs_checkpoint_is_refused_naming_the_keys(tmp_path):
    from safevid.checkpoint import CheckpointError, find_resume

    train = {"lr": 1e-3, "max_steps": 10, "lr_schedule": "constant"}
    saved = {"loss": {"beta": 0.1, "type": "sigmoid"}, "train": train, "output_dir": "a"}
    ckpt = tmp_path / "checkpoints"
    _fake_checkpoint(ckpt, 2, config=saved)
    # Longer runs (at a constant learning rate) and other output paths are the same run; the
    # loss and learning rate are not.
    same = {**saved, "train": {**train, "max_steps": 20}, "output_dir": "b"}
    assert find_resume(ckpt, same).step == 2
    other = {**saved, "loss": {"beta": 0.2, "type": "sigmoid"}, "train": {**train, "lr": 2e-3}}
    with pytest.raises(CheckpointError) as err:
        find_resume(ckpt, other)
    assert "loss.beta: 0.1 -> 0.2" in str(err.value) and "train.lr" in str(err.value)
    assert "train.max_steps:" not in str(err.value) and "output_dir:" not in str(err.value)
    # Under a decaying schedule the run's length sets the learning rate of every step.
    cosine = tmp_path / "cosine"
    _fake_checkpoint(cosine, 2, config={**saved, "train": {**train, "lr_schedule": "cosine"}})
    with pytest.raises(CheckpointError, match="train.max_steps: 10 -> 20"):
        find_resume(cosine, {**saved, "train": {**train, "lr_schedule": "cosine", "max_steps": 20}})


def test_rotation_keeps_newest_by_step_number_and_drops_torn(tmp_path):
    from safevid.checkpoint import rotate

    ckpt = tmp_path / "checkpoints"
    # Written out of step order (a resumed run re-saves later steps): age must not decide.
    for step in (30, 100, 20, 90):
        _fake_checkpoint(ckpt, step)
    _fake_checkpoint(ckpt, 110, complete=False)
    (ckpt / "step_00000020_universal").mkdir()
    rotate(ckpt, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000090", "step_00000100"]


# ---- unit: the step's metrics stay on the step's device -------------------------------------

def test_step_metrics_are_built_on_the_step_device():
    # `meta` stands in for a GPU: any tensor made on the CPU in the step's bookkeeping meets a
    # meta tensor in the reduction's stack and raises, as the CPU scalar did on CUDA.
    from safevid.dpo import STEP_KEYS, accumulate_step_metrics, stack_step_metrics

    meta = torch.device("meta")
    sums: dict = {}
    for _ in range(2):  # two micro-steps
        pairs = 3
        accumulate_step_metrics(
            sums, torch.empty(pairs, device=meta), torch.empty(pairs, device=meta),
            torch.empty(pairs, device=meta), torch.empty(2 * pairs, device=meta),
            torch.empty(pairs, device=meta), tokens=123, device=meta)
    assert set(sums) == set(STEP_KEYS)
    assert all(v.device == meta for v in sums.values())
    vec = stack_step_metrics(sums, meta)
    assert vec.device == meta and vec.shape == (len(STEP_KEYS),)


# ---- end to end ------------------------------------------------------------------------------

def _signal_launcher(run: Running, sig: int = signal.SIGUSR1) -> None:
    run.proc.send_signal(sig)


def _stop_record(out: Path) -> dict:
    return json.loads((out / "stopped.json").read_text())


def test_stops_on_signal_in_step_checkpoint_and_eval_and_survives_a_torn_write(
        demo_assets, life_baseline, tmp_path):
    out = tmp_path / "run"
    complete = out / "checkpoints"

    # 1. SIGUSR1 while a step runs: every rank finishes it, checkpoints it, stops, exits 0.
    run = start_train(out, demo_assets, 2, LIFE, env={"SAFEVID_TEST_DELAY": "step=2"})
    run.wait_for("test delay: rank 0 in step")
    _signal_launcher(run)
    assert run.finish() == 0, run.stderr[-3000:]
    first = _stop_record(out)["step"]
    assert first < 8 and (complete / f"step_{first:08d}" / "COMPLETE").is_file()
    assert "stopped after step" in run.stderr and "run the same command again" in run.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, first + 1))

    # 2. SIGUSR1 while a checkpoint is being written: that checkpoint completes, then stop.
    run = start_train(out, demo_assets, 2, LIFE, env={"SAFEVID_TEST_DELAY": "checkpoint=3"})
    run.wait_for("test delay: rank 1 in checkpoint")
    _signal_launcher(run)
    assert run.finish() == 0, run.stderr[-3000:]
    second = _stop_record(out)["step"]
    assert first < second < 8 and second % 2 == 0, (first, second)

    # 3. SIGUSR1 during held-out evaluation (steps 3 and 6).
    if second < 6:
        run = start_train(out, demo_assets, 2, LIFE, env={"SAFEVID_TEST_DELAY": "eval=3"})
        run.wait_for("test delay: rank 0 in eval")
        _signal_launcher(run)
        assert run.finish() == 0, run.stderr[-3000:]
        third = _stop_record(out)["step"]
        assert third % 3 == 0 and (complete / f"step_{third:08d}" / "COMPLETE").is_file()
        assert "eval/heldout/accuracy" in rows(out)[-1]

    # 4. SIGKILL of the whole job while a checkpoint is half written.
    run = start_train(out, demo_assets, 2, LIFE, env={"SAFEVID_TEST_DELAY": "checkpoint=30"})
    run.wait_for("test delay: rank 0 in checkpoint")
    run.kill()
    torn = [p for p in complete.glob("step_*") if not (p / "COMPLETE").exists()]
    assert torn, "the kill did not land inside a checkpoint write"
    logged = len(rows(out))

    # 5. The rest: resumes from the newest complete checkpoint, redoes the steps logged after
    #    it, and reproduces the uninterrupted run step for step (warm-up and cosine included).
    proc = run_train(out, demo_assets, world=2, extra=LIFE)
    assert "resuming from step" in proc.stderr
    assert logged > 0 and not (out / "stopped.json").exists()
    assert_reproduces(out, life_baseline)


def test_resume_on_another_world_size(demo_assets, life_baseline, tmp_path):
    """2 ranks to step 4, killed; 1 rank on from there to step 6, killed; 2 ranks to the end.
    Each resume converts the checkpoint to a universal one for its world size, and the whole
    reproduces the uninterrupted 2-rank run step for step."""
    out = tmp_path / "run"
    for before, after, step in ((2, 1, 4), (1, 2, 6)):
        run = start_train(out, demo_assets, before, LIFE, env={"SAFEVID_TEST_DELAY": "step=1"})
        marker = out / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
        deadline = time.monotonic() + 300
        while not marker.is_file():
            assert run.proc.poll() is None and time.monotonic() < deadline, run.stderr[-3000:]
            time.sleep(0.1)
        run.kill()
        if after == 2:
            assert "written by 2 ranks; converting it to a universal checkpoint" in run.stderr
    proc = run_train(out, demo_assets, world=2, extra=LIFE)
    assert "written by 1 ranks; converting it to a universal checkpoint" in proc.stderr
    assert_reproduces(out, life_baseline)


def test_two_launchers_act_as_two_nodes(demo_assets, life_baseline, tmp_path):
    from safevid.distributed import free_port

    out, port = tmp_path / "run", free_port()
    overrides = [f"output_dir={out}", f"demo.assets_dir={demo_assets}", *LIFE]
    nodes = [Running([sys.executable, "-m", "safevid.launcher", "--nnodes", "2", "--node-rank",
                      str(n), "--master-addr", "127.0.0.1", "--master-port", str(port),
                      "--nproc-per-node", "1", DEMO_CONFIG, *overrides], child_env())
             for n in (0, 1)]
    for node in nodes:
        assert node.finish(timeout=600) == 0, node.stderr[-3000:]
    assert "world 2" in nodes[0].stderr
    assert_reproduces(out, life_baseline)


def _rank_pid(launcher_pid: int, rank: int) -> int:
    import psutil

    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank) and "train" in proc.cmdline():
                return proc.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job_within_the_timeout(demo_assets, tmp_path, fault):
    import os

    timeout_s = 10
    run = start_train(tmp_path / "run", demo_assets, 2,
                      (*LIFE, "train.max_steps=50", f"train.collective_timeout_s={timeout_s}"))
    run.wait_for("dpo:")  # training has started
    while not (tmp_path / "run" / "metrics.jsonl").is_file():
        assert run.proc.poll() is None, run.stderr[-3000:]
        time.sleep(0.1)
    t0 = time.monotonic()
    os.kill(_rank_pid(run.proc.pid, 1), signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    # The bound: the collective timeout, DeepSpeed's launcher noticing within 1 s, and its
    # 30 s grace before it kills a rank that ignores SIGTERM (a stopped one cannot react).
    rc = run.finish(timeout=timeout_s + 60)
    elapsed = time.monotonic() - t0
    assert rc != 0 and elapsed < timeout_s + 45, (rc, elapsed)
    assert "safevid launcher: node 0" in run.stderr and "training failed" in run.stderr
    if fault == "hung":
        assert "rank 0 on" in run.stderr and "collective_timeout_s=10" in run.stderr


def test_refuses_a_checkpoint_of_another_config(demo_assets, life_baseline):
    proc = run_train(life_baseline, demo_assets, world=1, extra=(*LIFE, "loss.beta=0.5"),
                     check=False)
    assert proc.returncode == 2
    assert "different configuration" in proc.stderr and "loss.beta: 0.1 -> 0.5" in proc.stderr


def test_runs_exit_zero_every_time_and_leave_no_shared_memory(demo_assets, tmp_path):
    # Once in about 25 runs a finished rank used to abort at exit; short runs in a row, each
    # checked, are what a user scripting many runs does (and every other test's runs check
    # their exit status too). The last one runs 3 ranks
    # over the demo's 4 training shards (uneven shards per rank): every rank reads only its own
    # samples and none waits for another.
    before = shm_segments()
    short = ("train.eval_every=0", "train.export_hf=false", "data.eval_shards=null")
    for i, (world, extra) in enumerate([
            (2, ("train.max_steps=1",)),
            (3, ("train.max_steps=2", "train.pairs_per_step=12", "train.micro_batch_pairs=2"))]):
        proc = run_train(tmp_path / f"run{i}", demo_assets, world=world, extra=(*extra, *short),
                         check=False)
        assert proc.returncode == 0, (i, proc.stderr[-3000:])
        assert shm_segments() <= before, shm_segments() - before
    assert [r["pairs"] for r in rows(tmp_path / "run1")] == [12, 12]


def test_stale_shared_memory_of_killed_runs_is_swept(tmp_path):
    import os

    from safevid.distributed import SHM_DIR, SHM_PREFIX, sweep_stale_shm

    stale = SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_127.0.0.1_1_0"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = SHM_DIR / f"{SHM_PREFIX}_{os.getuid()}_127.0.0.1_2_0"
    fresh.write_bytes(b"x")  # a run starting right now: kept
    try:
        assert stale in sweep_stale_shm()
        assert not stale.exists() and fresh.exists()
    finally:
        stale.unlink(missing_ok=True)
        fresh.unlink(missing_ok=True)


def test_slurm_without_gpus_is_refused_unless_cpu_is_asked_for(tmp_path):
    env = {**child_env(), "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    env.pop("NPROC_PER_NODE", None)
    cmd = [sys.executable, "-m", "safevid.launcher", DEMO_CONFIG, f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no GPU is visible" in proc.stderr and "--gpus-per-node" in proc.stderr
    assert "NPROC_PER_NODE" in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing may start"
