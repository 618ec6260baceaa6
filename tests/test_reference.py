"""Precomputed reference log-probs and a separate reference model, with real DeepSpeed runs.

Features covered: `safevid precompute-ref` on 2 ranks writes one file per shard (training and
evaluation); training with `train.reference=precomputed` builds no reference model and
reproduces the live-reference run (losses, grad norms, learning rates, held-out evaluation);
refusals at start-up, each naming what differs (a missing file, another fingerprint, a stale
shard, missing pairs), also through the `safevid train` command; `model.ref_name_or_path`
scores with the named model (precomputed and live); TensorBoard events equal metrics.jsonl;
`train.export_every` writes plain transformers directories.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import DEMO_CONFIG, LIFE, REPO, child_env, rows, run_train
from tests.test_lifecycle import assert_reproduces


def precompute(assets: Path, out: Path, ref_dir: Path, world: int,
               extra: tuple[str, ...] = (), expect: int = 0) -> subprocess.CompletedProcess:
    overrides = [f"output_dir={out}", f"demo.assets_dir={assets}",
                 f"train.ref_logps_dir={ref_dir}", *extra]
    if world == 1:
        cmd = [sys.executable, "-m", "safevid", "precompute-ref", DEMO_CONFIG, *overrides]
    else:
        from safevid.launcher import launch_command

        cmd = launch_command([DEMO_CONFIG, *overrides], nproc=world, command="precompute-ref")[0]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def ref_dir(demo_assets, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("ref")
    proc = precompute(demo_assets, where / "run", where / "logps", world=2)
    assert "8 of 8 shards" in proc.stderr, proc.stderr[-2000:]
    return where / "logps"


@pytest.fixture(scope="module")
def precomputed_run(demo_assets, ref_dir, tmp_path_factory) -> Path:
    """The lifecycle baseline's settings with precomputed reference log-probs (2 ranks),
    exporting every 4 steps."""
    out = tmp_path_factory.mktemp("pre") / "run"
    proc = run_train(out, demo_assets, world=2,
                     extra=(*LIFE, "train.reference=precomputed", f"train.ref_logps_dir={ref_dir}",
                            "train.export_every=4"))
    assert "reference: precomputed log-probs" in proc.stderr
    return out


def test_precompute_writes_every_pair_of_every_shard(demo_assets, ref_dir):
    from safevid.data.indexed import load_index
    from safevid.reference import ref_file

    shards = sorted((demo_assets / "shards").glob("*.tar"))
    assert len(shards) == 8  # 4 training and 4 held-out shards
    for shard in shards:
        doc = json.loads(ref_file(str(shard), str(ref_dir)).read_text())
        assert set(doc["fingerprint"]) == {"reference", "tokenizer", "frames", "layout", "lengths"}
        counts = {r.key: r.pairs for r in load_index([str(shard)])}
        assert {k: len(v) for k, v in doc["samples"].items()} == counts
        for entries in doc["samples"].values():
            for pair_id, chosen, rejected, _texts in entries:
                # Summed log-probs of whole answers under a random model: well below 0.
                assert isinstance(pair_id, str) and chosen < -1 and rejected < -1


def test_a_failed_write_on_one_rank_ends_every_rank_alike_and_a_rerun_does_the_rest(
        demo_assets, ref_dir, tmp_path):
    """A shard file that cannot be written (here a directory in its place: a full disk acts
    alike) fails on the one rank that holds the shard. That rank must not end alone while the
    other waits in the next forward's gather: both finish the forwards, the other shards'
    files are written, and the job exits non-zero naming the file. The rerun then does only
    the shard without a current file; a torn write of an earlier attempt counts for nothing."""
    from safevid.reference import ref_file

    again = tmp_path / "logps"
    shutil.copytree(ref_dir, again)
    lost = ref_file(str(demo_assets / "shards" / "train-000002.tar"), str(again))
    written = ref_file(str(demo_assets / "shards" / "heldout-000001.tar"), str(again))
    before = json.loads(lost.read_text())
    lost.unlink()
    written.unlink()
    lost.mkdir()  # in the way of the rename
    (lost / "keep").write_text("")
    proc = precompute(demo_assets, tmp_path / "run", again, world=2, expect=1)
    assert "in 2 of 8 shards (6 already done) on 2 ranks" in proc.stderr, proc.stderr[-2000:]
    assert "could not be written" in proc.stderr and f"cannot write {lost}" in proc.stderr
    assert "The other 1 shards' files are written" in proc.stderr
    assert "safevid precompute-ref failed with exit code 1" in proc.stderr
    assert written.is_file() and not list(again.glob(".*.tmp-*"))  # no temporary left behind

    shutil.rmtree(lost)
    lost.with_name(f".{lost.name}.tmp-12345").write_text('{"samples": {')
    proc = precompute(demo_assets, tmp_path / "run", again, world=1)
    assert "in 1 of 8 shards (7 already done)" in proc.stderr, proc.stderr[-2000:]
    after = json.loads(lost.read_text())
    assert after["fingerprint"] == before["fingerprint"]
    for key, entries in before["samples"].items():
        for (pid, c, r, _), (pid2, c2, r2, _) in zip(entries, after["samples"][key], strict=True):
            assert pid == pid2 and (c2, r2) == pytest.approx((c, r), rel=1e-5)


def test_precomputed_reference_reproduces_the_live_run(precomputed_run, life_baseline):
    # 8 steps on 2 ranks against the same run with a live reference: loss, grad_norm, lr and
    # reward margin (held-out evaluation at steps 3, 6 and 8 included) to 1e-5. Measured:
    # 3e-7 relative; the rows are packed differently in the precompute, nothing else differs.
    assert_reproduces(precomputed_run, life_baseline)
    got, want = rows(precomputed_run), rows(life_baseline)
    for step in (3, 6, 8):
        assert got[step - 1]["eval/heldout/accuracy"] == want[step - 1]["eval/heldout/accuracy"]
        assert got[step - 1]["eval/heldout/margin"] == pytest.approx(
            want[step - 1]["eval/heldout/margin"], rel=1e-5, abs=1e-5)


def test_peak_memory_is_recorded(precomputed_run):
    # The largest RSS high-water mark of any rank, never falling (what the reference saves at
    # the benchmark's size is in benchmarks/RESULTS.md; at the demo's, it is noise).
    peaks = [r["memory/peak_rss_mib"] for r in rows(precomputed_run)]
    assert peaks[0] > 100 and peaks == sorted(peaks)


def test_tensorboard_events_hold_the_metrics(precomputed_run):
    from safevid.report import read_tensorboard

    series = read_tensorboard(precomputed_run)
    logged = rows(precomputed_run)
    for key in ("loss", "grad_norm", "lr", "rewards/accuracy", "eval/heldout/accuracy"):
        want = [(r["step"], r[key]) for r in logged if key in r]
        assert [s for s, _ in series[key]] == [s for s, _ in want], key
        assert [v for _, v in series[key]] == pytest.approx([v for _, v in want], rel=1e-6), key


def test_export_every_writes_plain_transformers_directories(precomputed_run):
    exports = precomputed_run / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["step_00000004", "step_00000008"]
    for d in exports.iterdir():
        assert (d / "config.json").is_file() and list(d.glob("*.safetensors"))
        assert (d / "tokenizer_config.json").is_file()
    from safetensors.torch import load_file

    a = load_file(next((exports / "step_00000004").glob("*.safetensors")))
    b = load_file(next((exports / "step_00000008").glob("*.safetensors")))
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed, "the two exports hold the same weights"


# ---- refusals at start-up ------------------------------------------------------------------

def _fingerprint(assets: Path, *overrides: str) -> tuple[dict, list[str]]:
    from safevid.config import load_config
    from safevid.dpo import Batcher
    from safevid.engine import prepare
    from safevid.reference import fingerprint
    from safevid.train import data_sets

    cfg = load_config(DEMO_CONFIG, [f"demo.assets_dir={assets}", *overrides])
    setup = prepare(cfg, 1, 1)
    _, train_urls, eval_urls = data_sets(cfg)
    fp = fingerprint(cfg, setup.family.name, str(setup.dtype).removeprefix("torch."),
                     Batcher.layout_of(cfg.data).name, False)
    return fp, train_urls + eval_urls


def test_the_files_of_this_run_are_accepted(demo_assets, ref_dir):
    from safevid.data.indexed import load_index
    from safevid.reference import RefTable

    fp, urls = _fingerprint(demo_assets)
    table = RefTable.load(urls, fp, str(ref_dir))
    assert len(table.values) == len(load_index(urls))  # every sample of every shard


def test_refuses_another_fingerprint_naming_what_differs(demo_assets, ref_dir):
    from safevid.reference import RefLogpsError, RefTable

    fp, urls = _fingerprint(demo_assets, "data.max_length=900")
    with pytest.raises(RefLogpsError, match=r"lengths: file \{'max_length': 1024.*this run "
                                            r"\{'max_length': 900") as err:
        RefTable.load(urls, fp, str(ref_dir))
    assert "reference:" not in str(err.value)  # only what differs is named
    fp, _ = _fingerprint(demo_assets, "data.shared_prefix=false", "data.packing=false")
    with pytest.raises(RefLogpsError, match="layout: file .*shared-prefix.* vs this run .*padded"):
        RefTable.load(urls, fp, str(ref_dir))


def test_refuses_missing_files_missing_pairs_and_stale_shards(demo_assets, ref_dir, tmp_path):
    from safevid.reference import RefLogpsError, RefTable, ref_file

    fp, _ = _fingerprint(demo_assets)
    shards = tmp_path / "shards"
    shards.mkdir()
    urls = []
    for name in ("train-000000", "train-000001", "train-000002"):
        shutil.copy(demo_assets / "shards" / f"{name}.tar", shards)
        shutil.copy(demo_assets / "shards" / f"{name}.idx.json", shards)
        urls.append(str(shards / f"{name}.tar"))
        src = ref_file(str(demo_assets / "shards" / f"{name}.tar"), str(ref_dir))
        shutil.copy(src, ref_file(urls[-1]))  # beside the copied shard
    RefTable.load(urls, fp)  # the copies are whole and current
    # missing pairs: one sample's entries cut short
    doc = json.loads(ref_file(urls[0]).read_text())
    key = sorted(doc["samples"])[0]
    doc["samples"][key] = doc["samples"][key][:-1]
    ref_file(urls[0]).write_text(json.dumps(doc))
    # stale: the shard rewritten with other contents since
    with open(urls[1], "ab") as f:
        f.write(b"\0" * 1024)
    # missing: no file at all
    ref_file(urls[2]).unlink()
    with pytest.raises(RefLogpsError) as err:
        RefTable.load(urls, fp)
    msg = str(err.value)
    assert f"missing pairs of 1 sample(s): {key}" in msg, msg
    assert f"stale: {urls[1]} has changed" in msg, msg
    assert f"{urls[2]}: no reference log-probs" in msg, msg
    assert "Run `safevid precompute-ref`" in msg


def test_a_pair_edited_in_place_is_stale_not_scored_with_old_numbers(demo_assets, ref_dir):
    """A label fix that swaps chosen and rejected keeps every size of the shard: the pair's
    own text digest tells it apart, and the pair weighs 0 instead of getting the other
    answer's log-probs."""
    from safevid.data_prep.rejects import Rejects

    from safevid.data.indexed import shard_pairs
    from safevid.reference import RefTable

    fp, urls = _fingerprint(demo_assets)
    table = RefTable.load(urls, fp, str(ref_dir))
    pair = next(shard_pairs(urls[0], Rejects(None)))
    chosen, rejected = table.lookup(pair)
    assert chosen < 0 and rejected < 0
    pair.chosen, pair.rejected = pair.rejected, pair.chosen
    assert table.lookup(pair).startswith("stale: the pair's text has changed")
    pair.chosen, pair.rejected = pair.rejected, pair.chosen
    pair.index += 1  # another pair's slot
    assert "are for pair" in table.lookup(pair)


def test_train_command_refuses_before_reading_weights(demo_assets, ref_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "safevid", "train", DEMO_CONFIG, f"output_dir={tmp_path / 'run'}",
         f"demo.assets_dir={demo_assets}", "train.reference=precomputed",
         f"train.ref_logps_dir={ref_dir}", "data.max_answer_tokens=64"],
        env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot use the precomputed reference log-probs" in proc.stderr
    assert "'max_answer_tokens': 128" in proc.stderr and "'max_answer_tokens': 64" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- a separate reference model -------------------------------------------------------------

@pytest.fixture(scope="module")
def other_reference(demo_assets, tmp_path_factory) -> Path:
    """The demo model with its language model's weights perturbed: another reference with the
    same family and tokenizer, as an SFT checkpoint would be."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(demo_assets / "model", out)
    weights = out / "model.safetensors"
    state = load_file(weights)
    gen = torch.Generator().manual_seed(1)
    for name, tensor in state.items():
        if "language_model" in name and tensor.is_floating_point():
            state[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=gen)
    save_file(state, weights, metadata={"format": "pt"})
    return out


def _logps(model_dir: Path, assets: Path, n: int = 4) -> list[float]:
    """Per-answer log-probs of the first `n` training pairs under `model_dir`, in-process."""
    from safevid.data_prep.rejects import Rejects

    from safevid.config import load_config
    from safevid.data.collate import batch_inputs
    from safevid.data.indexed import shard_pairs
    from safevid.dpo import Batcher
    from safevid.models.dpo_model import load

    cfg = load_config(DEMO_CONFIG, [f"demo.assets_dir={assets}"])
    loaded = load(str(model_dir), torch.float32, fused=True, family="llava_next_video")
    pairs = []
    for pair in shard_pairs(str(assets / "shards" / "train-000000.tar"), Rejects(None)):
        pairs.append(pair)
        if len(pairs) == n:
            break
    with torch.no_grad():
        logps, _ = loaded.model(**batch_inputs(Batcher(loaded, cfg.data)(pairs)))
    return [(p.video.key, p.index, float(c), float(r))
            for p, c, r in zip(pairs, logps[0::2], logps[1::2], strict=True)]


def test_precompute_scores_with_the_named_reference(demo_assets, ref_dir, other_reference,
                                                    tmp_path):
    from safevid.reference import ref_file

    logps_dir = tmp_path / "logps"
    precompute(demo_assets, tmp_path / "run", logps_dir, world=1,
               extra=(f"model.ref_name_or_path={other_reference}",))
    shard = str(demo_assets / "shards" / "train-000000.tar")
    doc = json.loads(ref_file(shard, str(logps_dir)).read_text())
    default = json.loads(ref_file(shard, str(ref_dir)).read_text())
    assert doc["fingerprint"]["reference"] != default["fingerprint"]["reference"]
    for key, index, chosen, rejected in _logps(other_reference, demo_assets):
        _, c, r, _ = doc["samples"][key][index]
        assert (c, r) == pytest.approx((chosen, rejected), rel=1e-5)
        _, c0, _, _ = default["samples"][key][index]
        assert abs(c - c0) > 1e-3  # not the policy's initial weights


def test_live_reference_is_the_named_model(demo_assets, other_reference):
    from safevid.config import load_config
    from safevid.engine import build_reference, prepare

    # Under ZeRO-2 the reference is a plain module, so it can be built without a process group.
    cfg = load_config(DEMO_CONFIG, [f"demo.assets_dir={demo_assets}",
                                    f"model.ref_name_or_path={other_reference}",
                                    "train.deepspeed_config=ds_configs/zero2.json"])
    reference, _ = build_reference(cfg, prepare(cfg, 1, 1))
    from safetensors.torch import load_file

    have = reference.hf.state_dict()["model.language_model.embed_tokens.weight"]
    want = load_file(other_reference / "model.safetensors")
    # The demo checkpoint is in the older LLaVA key layout, which transformers renames on load.
    assert torch.equal(have, want["language_model.model.embed_tokens.weight"])
    assert not any(p.requires_grad for p in reference.parameters())


def test_a_reference_of_another_family_is_refused(demo_assets):
    from safevid.config import ConfigError, load_config
    from safevid.engine import prepare

    cfg = load_config(DEMO_CONFIG, [f"demo.assets_dir={demo_assets}",
                                    f"model.ref_name_or_path={demo_assets / 'model_qwen2_vl'}"])
    with pytest.raises(ConfigError, match="model.ref_name_or_path.*is a qwen2_vl model; the "
                                          "policy is llava_next_video"):
        prepare(cfg, 1, 1)  # the set-up both commands make before reading any weight
