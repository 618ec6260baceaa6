"""End to end: real DeepSpeed ZeRO-3 processes (gloo on CPU), the tiny model, the demo shards.

Features covered: ZeRO-3 partitioning; learning (loss down, reward accuracy up); step-1 loss
of ln 2; world-size invariance (1 vs 2 ranks); fused vs plain log-probs; packed vs unpacked;
kill-and-resume exactness; the exported hf/ directory; summary, evaluation and plot outputs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env, losses, run_train, train_command

# The short runs for equivalence checks: constant schedule, checkpoints every 2 steps.
SHORT = ("train.max_steps=6", "train.save_every=2", "train.eval_every=0", "train.export_hf=false",
         "train.warmup_steps=0", "train.lr_schedule=constant", "data.eval_shards=null")
# fp32 on CPU; reductions in a different order (2 ranks, other packing) differ by rounding only.
TOL = 1e-5


@pytest.fixture(scope="module")
def long_run(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long") / "run"
    run_train(out, demo_assets, world=2, extra=("train.max_steps=40", "train.save_every=20"))
    return out


@pytest.fixture(scope="module")
def short_w1(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w1") / "run"
    run_train(out, demo_assets, world=1, extra=SHORT)
    return out


@pytest.fixture(scope="module")
def short_w2(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w2") / "run"
    run_train(out, demo_assets, world=2, extra=SHORT)
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def test_zero3_partitions_parameters(long_run):
    stats = [json.loads(p.read_text()) for p in sorted(long_run.glob("zero_partition_rank*.json"))]
    assert len(stats) == 2
    for s in stats:
        assert s["stage"] == 3
        # Each rank holds about half of every partitioned parameter, not the whole model.
        assert s["local_numel"] < 0.6 * s["total_numel"], s
    assert sum(s["local_numel"] for s in stats) >= stats[0]["total_numel"]


def test_learning_loss_down_accuracy_up(long_run):
    rows = _rows(long_run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    required = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                "rewards/margin", "logps/chosen", "logps/rejected", "lr", "grad_norm", "pairs",
                "tokens", "tokens_per_s", "elapsed_s"}
    assert required <= set(rows[0]), required - set(rows[0])
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.1, (first, last)
    # Policy equals reference at step 1: every reward is 0, so no pair counts as ranked right.
    assert rows[0]["rewards/accuracy"] == 0.0
    assert sum(r["rewards/accuracy"] for r in rows[-5:]) / 5 >= 0.9
    # The demo pairs are separable enough that one step already orders most of them; the margin
    # shows the learning that continues after that.
    early = sum(r["rewards/margin"] for r in rows[1:6]) / 5
    late = sum(r["rewards/margin"] for r in rows[-5:]) / 5
    assert late > 2 * early > 0, (early, late)
    summary = json.loads((long_run / "summary.json").read_text())
    assert summary["heldout_accuracy"] > 0.6, summary
    assert (long_run / "config.yaml").is_file()


def test_step_one_loss_is_ln2(short_w1, long_run):
    # Policy and reference start equal, so every pair's DPO loss is -log sigmoid(0) = ln 2.
    for run in (short_w1, long_run):
        assert abs(losses(run)[0] - math.log(2)) < 1e-6


def test_world_size_invariance(short_w1, short_w2):
    a, b = losses(short_w1)[:3], losses(short_w2)[:3]
    assert a == pytest.approx(b, abs=TOL, rel=TOL)


def test_fused_matches_plain_logprobs(short_w1, demo_assets, tmp_path):
    out = tmp_path / "plain"
    run_train(out, demo_assets, world=1, extra=(*SHORT, "train.max_steps=3",
                                                "train.fused_logprobs=false"))
    assert losses(out) == pytest.approx(losses(short_w1)[:3], abs=TOL, rel=TOL)


def test_packed_matches_unpacked(short_w1, demo_assets, tmp_path):
    out = tmp_path / "unpacked"
    run_train(out, demo_assets, world=1, extra=(*SHORT, "train.max_steps=3", "data.packing=false"))
    assert losses(out) == pytest.approx(losses(short_w1)[:3], abs=TOL, rel=TOL)


def test_gradient_checkpointing_matches(short_w1, demo_assets, tmp_path):
    out = tmp_path / "ckpt"
    run_train(out, demo_assets, world=1, extra=(*SHORT, "train.max_steps=3",
                                                "train.gradient_checkpointing=true"))
    assert losses(out) == pytest.approx(losses(short_w1)[:3], abs=TOL, rel=TOL)


def test_simpo_builds_no_reference(demo_assets, tmp_path):
    out = tmp_path / "simpo"
    proc = run_train(out, demo_assets, world=1, extra=(*SHORT, "train.max_steps=4",
                                                       "loss.type=simpo", "loss.beta=2.0"))
    assert "reference: none (simpo)" in proc.stderr
    values = losses(out)
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0]


def test_kill_and_resume_reproduces_run(short_w2, demo_assets, tmp_path):
    out = tmp_path / "resumed"
    overrides = [f"output_dir={out}", f"demo.assets_dir={demo_assets}", *SHORT]
    proc = subprocess.Popen(train_command(2, overrides), env=child_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        # Wait for the step-2 checkpoint, then kill the launcher and every rank at once.
        while not (latest.is_file() and latest.read_text().strip() >= "step_00000002"):
            assert proc.poll() is None, "run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(_rows(out))
    assert killed_at < 6, "the run finished before it could be killed"
    run_train(out, demo_assets, world=2, extra=SHORT)
    assert [r["step"] for r in _rows(out)] == list(range(1, 7))
    assert losses(out) == pytest.approx(losses(short_w2), abs=1e-6, rel=1e-6)


def test_exported_model_loads_with_plain_transformers(long_run, demo_assets):
    import torch
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    from safevid.data.collate import encode_pair
    from safevid.data.stream import expand_shards, read_all_pairs
    from safevid.models.llava_next_video import video_tokens_per_frame
    from safevid.models.preprocess import frame_spec_for

    hf_dir = long_run / "hf"
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    frames = frame_spec_for(hf_dir, model.config.vision_config.image_size)
    recorded = {json.loads(x)["id"]: json.loads(x)
                for x in (long_run / "eval_heldout.jsonl").read_text().splitlines()}
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "heldout-*.tar")), 4)

    class Video:
        token_id = model.config.video_token_index
        count = 4 * video_tokens_per_frame(model.config)

    # Frozen parts (vision tower, projector) are as built; the language model has trained.
    initial = LlavaNextVideoForConditionalGeneration.from_pretrained(demo_assets / "model")
    before, after = initial.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in after.items():
        if "vision_tower" in name or "multi_modal_projector" in name:
            assert torch.equal(tensor, before[name]), f"frozen {name} changed"
        elif "language_model" in name or "lm_head" in name:
            assert not torch.equal(tensor, before[name]), f"trainable {name} did not change"

    for pair in pairs:
        enc = encode_pair(pair, tok, Video, 128)
        pixels = frames(pair.video.frames())[None]
        for answer, key in ((enc.chosen, "logps/chosen"), (enc.rejected, "logps/rejected")):
            ids = torch.tensor([enc.prompt + answer])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values_videos=pixels).logits[0].double()
            start = len(enc.prompt) - 1
            logp = torch.log_softmax(logits, -1)[start:-1].gather(
                -1, torch.tensor(answer)[:, None]).sum().item()
            assert logp == pytest.approx(recorded[pair.id][key], abs=1e-3, rel=1e-4)


def test_corrupt_frames_are_rejected_and_training_goes_on(demo_assets, tmp_path):
    import io
    import tarfile

    good = sorted((demo_assets / "shards").glob("train-*.tar"))[0]
    bad = tmp_path / "corrupt-000000.tar"
    pairs = [{"id": f"corrupt-{i}", "prompt": f"What happens next in clip {i}?",
              "chosen": "I can describe it safely.", "rejected": "Sure, here it is."}
             for i in range(4)]
    members = {"corrupt.json": json.dumps({"id": "corrupt", "pairs": pairs}).encode()}
    members.update({f"corrupt.{i:03d}.jpg": b"\xff\xd8 not a jpeg" for i in range(4)})
    with tarfile.open(bad, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    n_good = sum(len(json.loads(tarfile.open(good).extractfile(m).read())["pairs"])
                 for m in tarfile.open(good).getmembers() if m.name.endswith(".json"))
    out = tmp_path / "run"
    steps = -(-(n_good + 4) // 16)  # enough steps to read the whole first epoch
    run_train(out, demo_assets, world=1, extra=(
        *SHORT, f"train.max_steps={steps}", f"data.shards={good},{bad}",
        "data.shuffle_buffer=1000"))
    rows = _rows(out)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    # Each corrupt pair is reported once, by name, however many epochs meet it again.
    assert sorted(r["source"] for r in rejects) == [f"corrupt/corrupt-{i}" for i in range(4)]
    assert all(r["reason"] == "undecodable frames (frame 0 of 4: UnidentifiedImageError)"
               for r in rejects)
    # Every step is the mean over its usable pairs; the corrupt ones count nowhere.
    assert sum(16 - r["pairs"] for r in rows) >= 4
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_slurm_script_builds_missing_assets_once(tmp_path):
    # Both ranks find the assets missing and start building at the same moment; the lock lets
    # one build while the other waits, and neither sees a half-built directory.
    assets, out = tmp_path / "fresh-assets", tmp_path / "run"
    env = {**child_env(), "NPROC_PER_NODE": "2"}
    proc = subprocess.run(
        ["bash", "slurm/train_dpo.sh", "configs/demo.yaml", f"output_dir={out}",
         f"demo.assets_dir={assets}", "train.max_steps=2", "train.eval_every=0",
         "train.export_hf=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert (assets / "COMPLETE").is_file()
    assert not list(tmp_path.glob(".fresh-assets.tmp-*")), "a half-built copy was left behind"


def test_plot_writes_png(long_run):
    proc = subprocess.run([os.sys.executable, "-m", "safevid", "plot", str(long_run)],
                          capture_output=True, text=True, env=child_env())
    assert proc.returncode == 0, proc.stderr
    png = Path(proc.stdout.strip())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
