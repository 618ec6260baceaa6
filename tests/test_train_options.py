"""The trainer's run options: run length by epochs, resuming from a named checkpoint, the
world-size rule, reporters, IPO's form, the shipped DeepSpeed configs; and every new key's
wrong value named in the error.

Features covered: `train.epochs` -> steps; `train.resume_from` (a step directory of another
run: the resumed steps reproduce that run's); a refusal of `pairs_per_step` naming the nearest
valid values; `train.report_to` asking for a reporter that is not installed; `zero2.json`
trains the demo on 2 CPU ranks with the ZeRO-3 run's numbers; the ZeRO++ multi-node config is
refused on CPU with its reason.
"""

from __future__ import annotations

import json
import math

import pytest

from safevid.config import ConfigError, check_world_size, load_config
from tests.conftest import DEMO_CONFIG, LIFE, rows, run_train
from tests.test_lifecycle import assert_reproduces


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.epochs=-1", "train.max_steps=0"], "train.epochs"),
        (["train.max_steps=0", "train.epochs=0"], "train.max_steps"),  # neither
        (["train.export_every=-2"], "train.export_every"),
        (["train.reference=cached"], "train.reference"),
        (["train.reference=precomputed", "loss.type=simpo"], "train.reference"),
        (["model.ref_name_or_path=/x", "loss.type=simpo"], "model.ref_name_or_path"),
        (["train.report_to=tensorboard,mlflow"], "train.report_to"),
        (["loss.ipo_form=avg"], "loss.ipo_form"),
        (["train.epochs=many"], "train.epochs"),
    ],
)
def test_each_new_key_with_a_wrong_value_is_named(overrides, key):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(DEMO_CONFIG, overrides)


def test_a_reporter_that_is_not_installed_is_refused(monkeypatch):
    import builtins

    from safevid.report import check_available

    real_import = builtins.__import__

    def without_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_wandb)
    with pytest.raises(ConfigError, match=r"train.report_to.*wandb asked for but not installed"):
        check_available(["tensorboard", "wandb"])
    check_available(["tensorboard"])


def test_pairs_per_step_that_does_not_split_names_the_nearest_values():
    cfg = load_config(DEMO_CONFIG, ["train.pairs_per_step=20", "train.micro_batch_pairs=4"])
    with pytest.raises(ConfigError, match=r"use a multiple of 8, the nearest being 16 or 24"):
        check_world_size(cfg, 2)
    cfg = load_config(DEMO_CONFIG, ["train.pairs_per_step=6", "train.micro_batch_pairs=4"])
    with pytest.raises(ConfigError, match=r"multiple of 12, the nearest being 12 \("):
        check_world_size(cfg, 3)


def test_epochs_set_the_number_of_steps(demo_assets):
    from safevid.data.indexed import load_index
    from safevid.train import data_sets, run_length

    cfg = load_config(DEMO_CONFIG, [f"demo.assets_dir={demo_assets}", "train.epochs=1.5"])
    assert run_length(cfg, []) == (60, "")  # train.max_steps > 0 wins
    cfg.train.max_steps = 0
    _, urls, _ = data_sets(cfg)
    pairs = sum(r.pairs for r in load_index(urls))
    steps, note = run_length(cfg, urls)
    assert steps == math.ceil(1.5 * pairs / 16)
    assert f"over {pairs} pairs at 16 per step: {steps} steps" in note


def test_resume_from_a_named_checkpoint(demo_assets, life_baseline, tmp_path):
    """A new output_dir started from the baseline run's step-6 checkpoint trains steps 7 and 8
    as the baseline did (weights, optimizer, schedule and data position all carried over)."""
    tag = life_baseline / "checkpoints" / "step_00000006"
    out = tmp_path / "run"
    proc = run_train(out, demo_assets, world=2, extra=(*LIFE, f"train.resume_from={tag}"))
    assert f"resuming from step 6 ({tag})" in proc.stderr
    got, want = rows(out), rows(life_baseline)[6:]
    assert [r["step"] for r in got] == [7, 8]
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5), key


def test_resume_from_refuses_what_it_cannot_use(life_baseline, tmp_path):
    from safevid.checkpoint import CheckpointError, find_named

    config = json.loads((life_baseline / "checkpoints" / "step_00000008" /
                         "trainer_state.json").read_text())["config"]
    assert find_named(life_baseline, config).step == 8  # a run directory: its newest
    with pytest.raises(CheckpointError, match="no such file"):
        find_named(tmp_path / "nowhere", config)
    torn = tmp_path / "step_00000003"
    torn.mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_named(torn, config)
    changed = {**config, "loss": {**config["loss"], "beta": 0.5}}
    with pytest.raises(CheckpointError, match=r"loss.beta: 0.1 -> 0.5"):
        find_named(life_baseline / "checkpoints" / "step_00000008", changed)


@pytest.mark.parametrize(("config", "stage"), [("zero2.json", 2), ("zero3_offload.json", 3)])
def test_other_zero_configs_train_the_demo_like_zero3(demo_assets, life_baseline, tmp_path,
                                                      config, stage):
    """ZeRO-2, and ZeRO-3 with the optimizer states and parameters offloaded to the CPU (our
    AdamW steps the offloaded partitions: DeepSpeed refuses a client optimizer there unless
    told), reproduce the ZeRO-3 run's losses and grad norms."""
    out = tmp_path / "run"
    proc = run_train(out, demo_assets, world=2,
                     extra=(*LIFE, f"train.deepspeed_config=ds_configs/{config}"))
    assert f"ZeRO stage {stage}" in proc.stderr
    assert_reproduces(out, life_baseline)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for CPU runs")
def test_zero_plus_plus_config_is_refused_on_cpu_with_its_reason():
    from safevid.engine import deepspeed_config

    cfg = load_config(DEMO_CONFIG, ["train.deepspeed_config=ds_configs/zero3_multinode.json"])
    with pytest.raises(ConfigError, match=r"zero3_multinode.json runs on GPUs only \(zero_quantized_weights, "
                                          r"zero_quantized_gradients need DeepSpeed's CUDA"):
        deepspeed_config(cfg, 1, 1, __import__("torch").float32)
