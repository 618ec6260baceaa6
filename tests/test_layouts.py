"""Row layouts (padded, packed, shared-prefix), attention backends, length rules and the
vision tower's call count, for every model family, on tiny models built from configs."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from safevid.config import ConfigError, check_lengths, load_config
from safevid.data.collate import (
    EncodedPair,
    Layout,
    Limits,
    PairTooLong,
    batch_inputs,
    collate,
    fit,
)
from safevid.data.stream import Pair, Video, expand_shards, read_all_pairs
from safevid.dpo import Batcher
from safevid.models.family import VideoInput

LAYOUTS = {
    "padded": (False, False, 4096),
    "packed": (False, True, 4096),
    "packed-small-rows": (False, True, None),  # 1.5 x the longest sequence
    "shared-prefix-one-per-row": (True, False, 4096),
    "shared-prefix": (True, True, 4096),
    "shared-prefix-small-rows": (True, True, None),  # 1.5 x the longest unit
}


def _data(shared: bool, packing: bool, budget: int, **kw) -> SimpleNamespace:
    return SimpleNamespace(max_answer_tokens=kw.get("max_answer_tokens", 256),
                           max_length=kw.get("max_length", 1024),
                           max_prompt_length=kw.get("max_prompt_length", 0),
                           shared_prefix=shared, packing=packing, max_tokens_per_row=budget)


MODEL_DIRS = {"llava_next_video": "model", "qwen2_vl": "model_qwen2_vl",
              "qwen2_5_vl": "model_qwen2_5_vl"}


@pytest.fixture(params=list(MODEL_DIRS))
def tiny(request, demo_assets):
    """(model directory, family name) of the demo's tiny random model of each family."""
    return demo_assets / MODEL_DIRS[request.param], request.param


def _varied_pairs(demo_assets) -> list[Pair]:
    """Pairs with answers of very different lengths (1 word to ~150 tokens) and videos of
    different frame counts (4, 3 and 2 frames; Qwen pads odd counts to its temporal patch)."""
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "train-*.tar")), 8)
    out = []
    for i, p in enumerate(pairs):
        q = copy.copy(p)
        frames = (4, 3, 2)[i % 3]
        q.video = Video(f"{p.video.key}-{frames}", p.video.meta, p.video.jpegs[:frames])
        if i % 4 == 1:
            q.chosen = "No."
        if i % 4 == 2:
            q.rejected = " ".join([p.rejected] * 6)
        out.append(q)
    # Two pairs of one video in the same micro-batch: its features are computed once.
    twin = copy.copy(out[0])
    twin.id, twin.prompt = twin.id + "-twin", "What happens at the end of this clip?"
    return [*out, twin]


def _logps(model_dir, family: str, pairs: list[Pair], data, backend: str = "sdpa_mask"):
    from safevid.models.dpo_model import load

    m = load(str(model_dir), torch.float32, fused=False, family=family, backend=backend)
    m.model.eval()
    batch = Batcher(m, data)(copy.deepcopy(pairs))
    with torch.no_grad():
        logps, lengths = m.model(**batch_inputs(batch.to("cpu", torch.float32)))
    return logps.double(), lengths, batch


def test_layouts_give_the_same_logps(tiny, demo_assets):
    """Per-answer log-probs (fp32, tolerance 1e-6 relative / 2e-4 absolute on sums of ~100
    token log-probs) equal across padded, packed and shared-prefix rows, with rows of one to
    many units, answers of very different lengths and videos of different frame counts.
    Catches an answer that sees the other answer or another unit, rejected positions that do
    not continue from the prompt (or mrope positions that are off in a packed row), and a first
    rejected token predicted from the wrong place."""
    model_dir, family = tiny
    pairs = _varied_pairs(demo_assets)
    want, want_len, padded = _logps(model_dir, family, pairs, _data(*LAYOUTS["padded"]))
    assert padded.input_ids.shape[0] == 2 * len(pairs)
    widest = {False: padded.input_ids.shape[1], True: _logps(
        model_dir, family, pairs, _data(*LAYOUTS["shared-prefix-one-per-row"]))[2].input_ids.shape[1]}
    for name, layout in LAYOUTS.items():
        if layout[2] is None:
            layout = (*layout[:2], widest[layout[0]] * 3 // 2)
        got, got_len, batch = _logps(model_dir, family, pairs, _data(*layout))
        assert torch.equal(got_len, want_len), name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}")
        if name.endswith("small-rows"):
            rows = batch.input_ids.shape[0]
            assert 1 < rows < (2 if name.startswith("packed") else 1) * len(pairs), name
            assert batch.input_ids.shape[1] <= layout[2]
    shared = _logps(model_dir, family, pairs, _data(*LAYOUTS["shared-prefix"]))[2]
    assert shared.tokens < padded.tokens  # the prompt once per pair


def test_flex_attention_matches_the_dense_mask(demo_assets):
    """The FlexAttention block mask (the GPU default) against SDPA with the dense mask, in a
    forward on CPU (FlexAttention has no CPU backward), shared-prefix rows packed."""
    pairs = _varied_pairs(demo_assets)
    data = _data(*LAYOUTS["shared-prefix"])
    model = demo_assets / "model"
    dense = _logps(model, "llava_next_video", pairs, data)[0]
    flex = _logps(model, "llava_next_video", pairs, data, backend="flex")[0]
    torch.testing.assert_close(flex, dense, rtol=1e-6, atol=2e-4)


def test_units_attention_matches_the_dense_mask(tiny, demo_assets):
    """`sdpa_units` (SDPA per piece of each row, the CPU default) against SDPA with the whole
    row's dense mask: per-answer log-probs and the gradient of every trainable weight (fp32),
    shared-prefix rows packed several units to a row, and padded rows. A cut inside a unit
    (an answer cut off from its prompt) changes both."""
    from safevid.models.dpo_model import load

    model_dir, family = tiny
    pairs = _varied_pairs(demo_assets)
    for layout in ("shared-prefix", "padded"):
        data = _data(*LAYOUTS[layout])
        got = {}
        for backend in ("sdpa_mask", "sdpa_units"):
            torch.manual_seed(0)
            m = load(str(model_dir), torch.float32, fused=False, family=family, backend=backend)
            m.model.eval()
            batch = Batcher(m, data)(copy.deepcopy(pairs))
            inputs = batch_inputs(batch.to("cpu", torch.float32))
            if layout == "shared-prefix":
                assert batch.input_ids.shape[0] < len(pairs)  # several units in a row
            logps, _ = m.model(**inputs)
            logps.sum().backward()
            grads = {n: p.grad.clone() for n, p in m.model.named_parameters()
                     if p.grad is not None}
            got[backend] = (logps.detach().double(), grads)
        (dense, dense_g), (units, units_g) = got["sdpa_mask"], got["sdpa_units"]
        torch.testing.assert_close(units, dense, rtol=1e-6, atol=2e-4,
                                   msg=lambda m, lay=layout: f"{lay}: {m}")
        assert dense_g.keys() == units_g.keys() and dense_g
        # Against the largest gradient anywhere: some are zero up to rounding (a key bias
        # cancels in the softmax).
        atol = 1e-6 * max(g.abs().max().item() for g in dense_g.values())
        for name, g in dense_g.items():
            torch.testing.assert_close(units_g[name], g, rtol=1e-4, atol=atol,
                                       msg=lambda m, n=name, lay=layout: f"{lay} {n}: {m}")


def test_units_pieces_cut_only_between_units():
    """Cuts fall where no later query sees an earlier key: between units and around padding,
    never inside a unit (a shared-prefix unit's rejected answer sees the prompt, not the
    chosen answer before it); short pieces merge forward."""
    from safevid.models.attention import allowed, pieces

    # Row 0: unit of 5 (prompt 3, chosen 1, rejected 1), unit of 4, 3 padding tokens.
    group = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1]])
    branch = torch.tensor([[0, 0, 0, 1, 2, 0, 0, 1, 2, 0, 0, 0]])
    mask = allowed(group, branch)
    assert pieces(mask, min_piece=1) == [[(0, 5), (5, 9), (9, 10), (10, 11), (11, 12)]]
    assert pieces(mask, min_piece=4) == [[(0, 5), (5, 9), (9, 12)]]
    assert pieces(mask, min_piece=64) == [[(0, 12)]]
    # The cut rule reads the mask: a unit whose rejected answer also saw the chosen one is
    # still never cut, nor one whose early token sees a later one (a non-causal mask).
    mask[0, 0, 4, 3] = True
    assert pieces(mask, min_piece=1)[0][:2] == [(0, 5), (5, 9)]
    mask[0, 0, 1, 7] = True
    assert pieces(mask, min_piece=1)[0][:1] == [(0, 9)]


def test_backend_choice_refuses_what_cannot_run(monkeypatch):
    """`auto` and the named backends per device, dtype and layout. A GPU and flash-attn cannot
    exist here: the package lookup and the card's compute capability stand in for them. flash-
    attn takes fp16/bf16 on Ampere or newer only: `auto` then picks FlexAttention, and a named
    `flash_varlen` is refused at start-up, not at the first forward after the weights load."""
    from safevid.models import attention
    from safevid.models.attention import AttentionError, choose

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose("auto", cpu, True) == choose("auto", cpu, False) == "sdpa_units"
    for name, layout_shared, match in (("flex", True, "no backward pass on CPU"),
                                       ("flash_varlen", False, "needs a CUDA device"),
                                       ("fast", False, "must be one of")):
        with pytest.raises(AttentionError, match=match):
            choose(name, cpu, layout_shared)
    real_find_spec = attention.importlib.util.find_spec
    monkeypatch.setattr(attention.importlib.util, "find_spec",
                        lambda name: object() if name == "flash_attn" else real_find_spec(name))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    for capability, bf16_pick in (((9, 0), "flash_varlen"), ((7, 5), "flex")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert choose("auto", cuda, False, torch.bfloat16) == bf16_pick
        assert choose("auto", cuda, False, torch.float32) == "flex"
        assert choose("auto", cuda, True, torch.bfloat16) == "flex"  # shared-prefix rows
        with pytest.raises(AttentionError, match="fp16 or bf16"):
            choose("flash_varlen", cuda, False, torch.float32)
        with pytest.raises(AttentionError, match="shared-prefix"):
            choose("flash_varlen", cuda, True, torch.bfloat16)
    with pytest.raises(AttentionError, match="Ampere or newer GPU, and a GPU is older"):
        choose("flash_varlen", cuda, False, torch.bfloat16)


def test_varlen_packing_matches_the_dense_mask(tiny, demo_assets):
    """`flash_varlen`'s side of the contract, on CPU: the real tokens of all rows made one row,
    answer indices remapped, and each sequence's text positions restarting at 0, so that
    transformers finds the sequences from the positions alone. flash-attn cannot run here, so
    transformers' own position-id packing for SDPA (the same rule: a sequence starts where the
    positions restart) stands in for its kernel; the cu_seqlens transformers would hand the
    varlen kernel are checked against the collated sequences too. Per-answer log-probs equal
    padded rows with the dense mask, for packed rows of many sequences and for padded rows.
    Catches answer indices left pointing into the unflattened rows, positions that run on
    across sequences (one sequence would attend into the one before it), and padding kept."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    from safevid.models.dpo_model import load

    model_dir, family = tiny
    pairs = _varied_pairs(demo_assets)
    want = _logps(model_dir, family, pairs, _data(*LAYOUTS["padded"]))[0]
    for layout in ("packed", "padded"):
        m = load(str(model_dir), torch.float32, fused=False, family=family, backend="sdpa_mask")
        m.model.eval()
        m.model.backend = "flash_varlen"  # the flattening; the text model keeps SDPA
        seen = {}
        m.family.language_model(m.model.hf).register_forward_pre_hook(
            lambda mod, args, kwargs, seen=seen: seen.update(kwargs), with_kwargs=True)
        batch = Batcher(m, _data(*LAYOUTS[layout]))(copy.deepcopy(pairs))
        if layout == "packed":
            assert batch.input_ids.shape[0] < len(pairs)  # several sequences in a row
        with torch.no_grad():
            got = m.model(**batch_inputs(batch.to("cpu", torch.float32)))[0].double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-4,
                                   msg=lambda msg, lay=layout: f"{lay}: {msg}")

        assert seen["attention_mask"] is None and seen["inputs_embeds"].shape[0] == 1
        position_ids = seen["position_ids"]
        text = position_ids[0] if position_ids.dim() == 3 else position_ids  # Qwen: row 0
        assert text.shape == (1, batch.tokens)  # real tokens only
        keep = batch.group >= 0
        ids = (torch.arange(batch.group.shape[0])[:, None] * 10**6 + batch.group)[keep]
        starts = torch.cat([torch.tensor([True]), ids[1:] != ids[:-1]]).nonzero().flatten()
        (cu_q, cu_k), _ = prepare_fa_kwargs_from_position_ids(text)
        assert cu_q.tolist() == [*starts.tolist(), batch.tokens] and torch.equal(cu_q, cu_k)
        assert len(starts) == 2 * len(pairs)

def test_vision_tower_runs_once_per_video_per_micro_step(tiny, demo_assets):
    """Counted: one vision-tower call per micro-batch, over each distinct video once (two pairs
    of one video, and the shared prompt's single placeholder run per pair)."""
    from safevid.models.dpo_model import load

    model_dir, family = tiny
    m = load(str(model_dir), torch.float32, fused=False, family=family)
    m.model.eval()
    calls: list[int] = []
    tower = m.family.vision_modules(m.model.hf)[0]
    tower.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    pairs = _varied_pairs(demo_assets)
    for layout in ("padded", "shared-prefix"):
        calls.clear()
        batch = Batcher(m, _data(*LAYOUTS[layout]))(copy.deepcopy(pairs))
        assert len(batch.frames) == len(pairs) - 1  # the twin shares its video
        with torch.no_grad():
            m.model(**batch_inputs(batch.to("cpu", torch.float32)))
        assert calls == [batch.pixels.shape[0]], layout
        runs = len(pairs) * (1 if layout == "shared-prefix" else 2)
        assert len(batch.video_of_slot) == runs


class _OneTokenVideo:
    """A family stand-in for hand-made token ids: 1D positions, one placeholder per video."""

    position_rows = 1
    video_token_id = 99

    def positions(self, ids, video):
        return torch.arange(len(ids))[None]


def test_targets_and_positions_follow_each_sequence():
    """Hand-made tokens, written out: prompt 5 6 7, chosen 8 9, rejected 10 (pair 0) and prompt
    11 12, chosen 13, rejected 14 15 16 (pair 1). Every answer token's predicting position
    holds the token before it in its own sequence; in shared-prefix units the rejected answer
    is predicted first from the last prompt token and its positions continue from the prompt."""
    enc = [EncodedPair([5, 6, 7], [8, 9], [10]), EncodedPair([11, 12], [13], [14, 15, 16])]
    video = VideoInput(torch.zeros(1, 3, 2, 2), 1)
    for name, (shared, packing, budget) in LAYOUTS.items():
        layout = Layout(shared, packing, budget or 9)  # 9: several rows of these short units
        b = collate(enc, [video], [0, 0], _OneTokenVideo(), 0, layout)
        flat = b.input_ids.flatten()
        for s, ans in enumerate([e.chosen if k == 0 else e.rejected for e in enc for k in (0, 1)]):
            e = enc[s // 2]
            sel = b.answer_seq == s
            assert b.answer_tgt[sel].tolist() == ans, name
            assert flat[b.answer_src[sel]].tolist() == [e.prompt[-1], *ans[:-1]], name
    shared = collate(enc, [video], [0, 0], _OneTokenVideo(), 0, Layout(True, True, 64))
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert shared.positions[0].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4]]
    assert shared.branch.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2, 2]]
    assert shared.group.tolist() == [[0] * 6 + [1] * 6]


def test_answer_cut_to_the_length_rules_keeps_no_eos():
    eos = 2
    prompt, long_answer, short = list(range(10, 20)), [7] * 30 + [eos], [8, eos]
    e = fit("p", prompt, long_answer, short, Limits(max_answer_tokens=512, max_length=16))
    assert e.chosen == [7] * 6 and eos not in e.chosen  # cut: the model must not learn to stop
    assert e.rejected == short  # whole: its EOS stays
    e = fit("p", prompt, long_answer, short, Limits(max_answer_tokens=4, max_length=0))
    assert e.chosen == [7] * 4
    with pytest.raises(PairTooLong, match=r"prompt 10 tokens, chosen 31, rejected 2"):
        fit("p", prompt, long_answer, short, Limits(512, max_length=10))
    with pytest.raises(PairTooLong, match="data.max_prompt_length=8"):
        fit("p", prompt, long_answer, short, Limits(512, 0, max_prompt_length=8))


def test_lengths_are_checked_against_the_model_and_the_rows():
    cfg = load_config(None, ["data.max_length=0", "data.max_tokens_per_row=8192"])
    assert check_lengths(cfg, 4096) == 4096  # 0: the context window; 4096 + 512 fits 8192
    cfg.data.max_length = 5000
    with pytest.raises(ConfigError, match="over the model's context window of 4096"):
        check_lengths(cfg, 4096)
    cfg.data.max_length, cfg.data.max_tokens_per_row = 4096, 4607
    with pytest.raises(ConfigError, match=r"data.max_tokens_per_row.*under data.max_length \+ 512"):
        check_lengths(cfg, 4096)  # a unit may need 4096 + 512 (max_answer_tokens) tokens
    cfg.data.max_tokens_per_row = 4608
    assert check_lengths(cfg, 4096) == 4096
    cfg.data.max_answer_tokens, cfg.data.max_length = 8000, 1000  # answers cut by max_length
    assert check_lengths(cfg, 4096) == 1000 and 1000 + 999 <= cfg.data.max_tokens_per_row
    cfg.data.max_length, cfg.data.max_tokens_per_row = 4096, 4096
    cfg.data.shared_prefix = False
    assert check_lengths(cfg, 4096) == 4096
    cfg.data.max_prompt_length = 4096
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        check_lengths(cfg, 4096)


def test_over_long_pair_is_rejected_with_its_lengths_and_weighs_nothing(demo_assets):
    """A pair whose prompt cannot fit keeps its slot as a small stand-in of weight 0; the
    others' log-probs are unchanged."""
    from safevid.models.dpo_model import load

    m = load(str(demo_assets / "model"), torch.float32, fused=False)
    m.model.eval()
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "train-*.tar")), 3)
    long = copy.deepcopy(pairs[1])
    long.prompt = " ".join(["describe every frame"] * 200)
    batcher = Batcher(m, _data(True, True, 4096, max_length=256))
    reason = batcher.encode(long)
    assert reason is not None and reason.startswith("too long: prompt") and "max_length=256" in reason
    mixed = [copy.deepcopy(pairs[0]), long, copy.deepcopy(pairs[2])]
    mixed[1].valid = False
    with torch.no_grad():
        got = m.model(**batch_inputs(batcher(mixed).to("cpu", torch.float32)))[0]
        want = m.model(**batch_inputs(
            batcher([copy.deepcopy(pairs[0]), copy.deepcopy(pairs[2])]).to("cpu", torch.float32)))[0]
    torch.testing.assert_close(got[[0, 1, 4, 5]], want, rtol=1e-6, atol=1e-4)
    assert np.isfinite(got.numpy()).all()


def test_qwen_demo_trains_on_two_ranks_in_every_layout_and_exports(demo_assets, tmp_path):
    """configs/demo_qwen2_vl.yaml on 2 ZeRO-3 ranks: shared-prefix rows against padded rows,
    the same losses and gradient norms; the exported hf/ loads with plain transformers and its
    own forward (its own mrope positions from `video_grid_thw`) gives the answer log-probs the
    trainer recorded for the held-out pairs."""
    import json
    import subprocess

    from safevid.launcher import launch_command
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from safevid.data.collate import Limits, VideoTokens, encode_pair
    from safevid.models.dpo_model import load_family
    from tests.conftest import REPO, child_env, rows

    def train(out, *extra):
        overrides = [f"output_dir={out}", f"demo.assets_dir={demo_assets}", "train.max_steps=3",
                     "train.save_every=0", "train.eval_every=0", *extra]
        cmd = launch_command(["configs/demo_qwen2_vl.yaml", *overrides], nproc=2)[0]
        proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    shared = tmp_path / "shared"
    proc = train(shared, "data.eval_max_pairs=6")
    assert "family qwen2_vl, layout shared-prefix" in proc.stderr
    train(tmp_path / "padded", "data.shared_prefix=false", "data.packing=false",
          "train.export_hf=false", "data.eval_shards=null")
    got, want = rows(shared), rows(tmp_path / "padded")
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5), key

    hf_dir = shared / "hf"
    model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    family = load_family(str(hf_dir))  # the exported processor files
    recorded = {json.loads(x)["id"]: json.loads(x)
                for x in (shared / "eval_heldout.jsonl").read_text().splitlines()}
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "heldout-*.tar")), 2)
    for pair in pairs:
        video = family.prepare_video(pair.video.frames(), pair.video.meta)
        enc = encode_pair(pair, tok, VideoTokens(family.video_token_id, video.tokens),
                          Limits(128, 1024))
        for answer, key in ((enc.chosen, "logps/chosen"), (enc.rejected, "logps/rejected")):
            ids = torch.tensor([enc.prompt + answer])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values_videos=video.pixels,
                               video_grid_thw=video.grid_thw[None],
                               mm_token_type_ids=(ids == family.video_token_id).int() * 2).logits
            start = len(enc.prompt) - 1
            logp = torch.log_softmax(logits[0].double(), -1)[start:-1].gather(
                -1, torch.tensor(answer)[:, None]).sum().item()
            assert logp == pytest.approx(recorded[pair.id][key], abs=1e-3, rel=1e-4)
