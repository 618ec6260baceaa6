"""User text is text: special-token strings in prompts and answers, and pairs whose text cannot
be encoded at all.

Before, a `<video>` typed in a query raised on the one rank that held the pair (the others hung
in a ZeRO-3 gather), and a `</s>` inside an answer became an EOS. Now such strings are tokenized
as ordinary text, and a pair that cannot be encoded (a lone surrogate from a shard's JSON) is
rejected by name and weighs 0, decided in the prefetch thread before the step counts its
usable pairs, and training goes on.
"""

from __future__ import annotations

import io
import json
import math
import tarfile

from safevid.data.collate import Limits, VideoTokens, encode_pair, encode_prompt
from safevid.data.stream import Pair
from tests.conftest import rows, run_train

HOSTILE = ["<video>", "<image>", "</s>", "<s>", "<pad>", "<unk>", "<|im_end|>"]


def _tokenizer(assets):
    from safevid.models.family import load_tokenizer

    return load_tokenizer(str(assets / "model"))


def test_special_token_strings_are_plain_text(demo_assets):
    tok = _tokenizer(demo_assets)
    video = VideoTokens(tok.convert_tokens_to_ids("<video>"), 16)
    specials = set(tok.all_special_ids)
    text = "Is " + " and ".join(HOSTILE) + " in the clip?"
    pair = Pair("p", text, "Fine </s> still talking", "Sure <video> here", None)
    enc = encode_pair(pair, tok, video, Limits(128, 0))
    # Exactly one video (the template's), one BOS, and one EOS per answer: the final token.
    assert enc.prompt.count(video.token_id) == video.count
    assert enc.prompt.count(tok.bos_token_id) == 1
    for answer in (enc.chosen, enc.rejected):
        assert answer[-1] == tok.eos_token_id and not specials & set(answer[:-1])
    user_part = [t for t in enc.prompt if t != video.token_id and t != tok.bos_token_id]
    assert not specials & set(user_part)
    assert all(s in tok.decode(enc.prompt) for s in HOSTILE)
    assert "</s> still talking" in tok.decode(enc.chosen[:-1])


def test_ordinary_prompts_encode_as_the_whole_template_does(demo_assets):
    # The text-safe path must not change what ordinary prompts become: the rendered template,
    # tokenized in one piece, as the model's own processor does.
    tok = _tokenizer(demo_assets)
    video = VideoTokens(tok.convert_tokens_to_ids("<video>"), 4)
    for prompt in ("What is happening here?", "Describe the scene in detail.", "x"):
        messages = [{"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": prompt}]}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        whole = tok(rendered, add_special_tokens=False)["input_ids"]
        if whole[0] != tok.bos_token_id:
            whole = [tok.bos_token_id] + whole
        expanded = [x for t in whole for x in ([t] * 4 if t == video.token_id else [t])]
        assert encode_prompt(prompt, tok, video) == expanded


def test_tokens_added_as_special_outside_the_map_are_text_too(demo_assets, tmp_path):
    # Conversion scripts add <video>/<image> with add_tokens(..., special_tokens=True): such
    # tokens are matched whole but are not in all_special_tokens.
    tok = _tokenizer(demo_assets)
    tok.add_tokens(["<clip_marker>"], special_tokens=True)
    assert "<clip_marker>" not in tok.all_special_tokens
    marker = tok.convert_tokens_to_ids("<clip_marker>")
    video = VideoTokens(tok.convert_tokens_to_ids("<video>"), 4)
    assert marker not in encode_prompt("Where is <clip_marker> in it?", tok, video)
    assert marker in tok("Where is <clip_marker> in it?", add_special_tokens=False)["input_ids"]


def _hostile_shard(good: str, path, videos: tuple[str, ...] = ("hostile",),
                   plain: int = 0) -> list[dict]:
    """Videos (frames copied from a good shard) whose pairs carry special-token strings, one
    pair whose text cannot be encoded and one whose prompt is over data.max_length; and a video
    of `plain` ordinary pairs."""
    with tarfile.open(good) as tar:
        members = tar.getmembers()
        key = members[0].name.split(".")[0]
        jpegs = [tar.extractfile(m).read() for m in members
                 if m.name.startswith(key + ".") and m.name.endswith(".jpg")]
    pairs = [
        {"id": "text-video", "prompt": "Is the <video> tag in this sentence a problem?",
         "chosen": "It is plain text </s> and so is this.", "rejected": "<s> Sure <image>."},
        {"id": "text-im-end", "prompt": "Say <|im_end|> then stop.",
         "chosen": "I will not stop early.", "rejected": "<pad><unk>"},
        {"id": "broken-text", "prompt": "bad \ud800 text", "chosen": "a", "rejected": "b"},
        {"id": "too-long", "prompt": " ".join(["Describe every frame in detail."] * 300),
         "chosen": "No.", "rejected": "Yes."},
    ]
    ordinary = [{"id": f"plain-{i}", "prompt": "What happens here?", "chosen": "A calm scene.",
                 "rejected": "Nothing you need to know."} for i in range(plain)]
    files = {}
    for video, its in [(v, pairs) for v in videos] + [("plain", ordinary)] * bool(plain):
        files[f"{video}.json"] = json.dumps({"id": video, "pairs": its}).encode()
        files.update({f"{video}.{i:03d}.jpg": data for i, data in enumerate(jpegs)})
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return pairs


def test_hostile_text_in_shards_trains_on_two_ranks(demo_assets, tmp_path):
    good = sorted((demo_assets / "shards").glob("train-*.tar"))[0]
    with tarfile.open(good) as tar:
        n_good = sum(len(json.loads(tar.extractfile(m).read())["pairs"])
                     for m in tar.getmembers() if m.name.endswith(".json"))
    # Two hostile videos (bad pairs for both ranks) and as many ordinary pairs as make the
    # epoch whole steps of 16: every hostile pair is met once, none twice.
    k, plain = 2, -(n_good + 8) % 16
    videos = tuple(f"hostile{i}" for i in range(k))
    hostile = tmp_path / "hostile-000000.tar"
    _hostile_shard(str(good), hostile, videos=videos, plain=plain)
    heldout = tmp_path / "heldout-000000.tar"  # the same pairs, for the held-out evaluation
    _hostile_shard(str(good), heldout)
    steps = (n_good + 4 * k + plain) // 16
    out = tmp_path / "run"
    out.mkdir()  # an earlier attempt that never checkpointed: its records are not this run's
    for stale in ("rejects.jsonl", "rejects.rank3.jsonl"):
        (out / stale).write_text(json.dumps({"source": "stale", "reason": "earlier"}) + "\n")
    run_train(out, demo_assets, world=2, timeout=600, extra=(
        f"train.max_steps={steps}", f"data.shards={good},{hostile}", "data.shuffle_buffer=1000",
        "train.eval_every=0", "train.export_hf=false", f"data.eval_shards={heldout}",
        f"data.eval_max_pairs={n_good}"))  # the training set's evaluation: the good pairs
    logged = rows(out)
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in logged)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    # Only the pairs that cannot be encoded and the over-long ones are rejected, by name, with
    # the reason (the lengths for a long one); the pairs with special-token strings trained as
    # text. The held-out evaluation (rank 0) rejects its copies alike and scores the other two.
    reasons = {tuple(r["source"].split(":", 1)): r["reason"] for r in rejects}
    trained = [(str(hostile), f"{v}/{i}") for v in videos for i in ("broken-text", "too-long")]
    held = [(str(heldout), f"hostile/{i}") for i in ("broken-text", "too-long")]
    assert sorted(reasons) == sorted(trained + held)
    for key, reason in reasons.items():
        if key[1].endswith("broken-text"):
            assert reason.startswith("cannot encode: TypeError")
        else:
            assert reason.startswith("too long: prompt ") and "data.max_length=1024" in reason
    assert logged[-1]["eval/heldout/pairs"] == 2
    # Each rank wrote what it met to its own file: rank 1 bad training pairs (its share of
    # their steps), rank 0 the held-out ones. Both files were folded into rejects.jsonl, and
    # the summary counts what it holds.
    by_rank = {tuple(r["source"].split(":", 1)): r["rank"] for r in rejects}
    assert 1 in {by_rank[key] for key in trained}, by_rank
    assert {by_rank[key] for key in held} == {0}
    assert not list(out.glob("rejects.rank*.jsonl"))
    assert json.loads((out / "summary.json").read_text())["rejected_samples"] == 2 * k + 2
    # Their slots stay in their steps (the same forwards on every rank) and weigh nothing there.
    assert sum(16 - r["pairs"] for r in logged) == 2 * k
