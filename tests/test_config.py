"""Config errors name the key and exit non-zero, through the real `safevid train` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from safevid.config import ConfigError, check_world_size, load_config
from tests.conftest import DEMO_CONFIG, REPO, child_env


def _train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safevid", "train", DEMO_CONFIG, *overrides],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_stepz=3", "train.max_stepz"),  # unknown key
        ("train.max_steps=three", "train.max_steps"),  # wrong type
        ("loss.type=dpo-ish", "loss.type"),  # not one of the loss family
        ("train.fused_logprobs=maybe", "train.fused_logprobs"),
        ("loss.label_smoothing=0.7", "loss.label_smoothing"),
    ],
)
def test_bad_override_names_key(override, expected):
    proc = _train(override)
    assert proc.returncode == 2
    assert expected in proc.stderr and "config error" in proc.stderr, proc.stderr


def test_missing_shard_path(tmp_path):
    missing = tmp_path / "nowhere" / "train-000000.tar"
    proc = _train("demo.build=false", f"data.shards={missing}", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "data.shards" in proc.stderr and str(missing) in proc.stderr, proc.stderr


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  warmup: 2\n")
    with pytest.raises(ConfigError, match="train.warmup"):
        load_config(bad)


def test_overrides_and_interpolation():
    cfg = load_config(DEMO_CONFIG, ["demo.assets_dir=/x", "train.max_steps=7", "data.packing=false"])
    assert cfg.train.max_steps == 7 and cfg.data.packing is False
    assert cfg.model.name_or_path == "/x/model" and cfg.data.shards == "/x/shards/train-*.tar"


def test_string_overrides_are_taken_as_given():
    """A string key's value is text, not YAML: globs, brace patterns and digits survive (read as
    YAML, `*.tar` and `{a,b}` do not parse and `0123` is octal 83); `null` still clears a key
    that may be null, and interpolations still resolve."""
    cfg = load_config(DEMO_CONFIG, ["data.shards=/d/*.tar", "data.eval_shards=null",
                                    "output_dir=0123", "demo.assets_dir=/x",
                                    "model.name_or_path=${demo.assets_dir}/m"])
    assert cfg.data.shards == "/d/*.tar" and cfg.data.eval_shards is None
    assert cfg.output_dir == "0123" and cfg.model.name_or_path == "/x/m"
    cfg = load_config(DEMO_CONFIG, ["data.shards={a,b}/train-*.tar", "output_dir='runs/a b'",
                                    "data.mix=[{shards: x.tar, weight: 2}]", "data.mix.0.shards=/m/*.tar"])
    assert cfg.data.shards == "{a,b}/train-*.tar" and cfg.output_dir == "runs/a b"
    assert cfg.data.mix[0].shards == "/m/*.tar" and cfg.data.mix[0].weight == 2
    with pytest.raises(ConfigError, match="train.ref_logps_dir"):  # may not be null
        load_config(DEMO_CONFIG, ["train.ref_logps_dir=null"])


def test_label_smoothing_only_for_losses_that_use_it():
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        load_config(DEMO_CONFIG, ["loss.type=ipo", "loss.label_smoothing=0.1"])
    assert load_config(DEMO_CONFIG, ["loss.type=cdpo", "loss.label_smoothing=0.1"])


def test_pairs_must_split_evenly_over_ranks():
    cfg = load_config(DEMO_CONFIG, ["train.pairs_per_step=12", "train.micro_batch_pairs=4"])
    assert check_world_size(cfg, 1) == 3
    with pytest.raises(ConfigError, match="train.pairs_per_step"):
        check_world_size(cfg, 2)
