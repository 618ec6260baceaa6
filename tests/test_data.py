"""Shards, the pair stream and collation: real H.264 files decoded by decord, real tar shards."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from safevid.data_prep.prepare import main as prepare_main
from safevid.data_prep.rejects import Rejects
from safevid.data_prep.synthetic import draw_scene, write_video

from safevid.data.collate import IGNORE, collate, encode_pair
from safevid.data.stream import PairStream, expand_shards, read_all_pairs


def _pairs_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_counts_and_rejects_bad_inputs(tmp_path, capsys):
    videos = tmp_path / "videos"
    for name in ("good1", "good2"):
        write_video(draw_scene(name), videos / f"{name}.mp4")
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    rows = [
        {"id": f"g{i}", "video_id": f"good{i % 2 + 1}", "prompt": "q", "chosen": "c", "rejected": "r"}
        for i in range(5)
    ]
    rows += [
        {"id": "b1", "video_id": "broken", "prompt": "q", "chosen": "c", "rejected": "r"},
        {"id": "m1", "video_id": "missing", "prompt": "q", "chosen": "c", "rejected": "r"},
        {"id": "e1", "video_id": "good1", "prompt": "q", "chosen": "", "rejected": "r"},
    ]
    pairs = _pairs_file(tmp_path / "pairs.jsonl", rows)
    with open(pairs, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "shards"
    assert prepare_main(["--videos", str(videos), "--pairs", str(pairs), "--out", str(out),
                         "--frames", "4", "--size", "32"]) == 0
    index = json.loads((out / "index.json").read_text())
    totals = index["totals"]
    assert totals == {"videos": 2, "pairs": 5, "rejected": 4, "inputs": 9}
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = " ".join(r["reason"] for r in rejects)
    assert "broken.mp4" in reasons and "missing.mp4" in reasons
    assert "missing fields" in reasons and "invalid JSON" in reasons
    assert all(r["source"].startswith(str(pairs)) for r in rejects)
    # A video is stored once with all its pairs; frames are JPEGs of the requested size.
    pairs_read = read_all_pairs(expand_shards(str(out / "train-*.tar")), 100)
    assert sorted(p.id for p in pairs_read) == [f"g{i}" for i in range(5)]
    assert pairs_read[0].video.frames().shape == (4, 32, 32, 3)
    assert index["frames"]["num_frames"] == 4


def _tar_with(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_in_shards_are_skipped_and_recorded(tmp_path, demo_assets):
    good = sorted((demo_assets / "shards").glob("train-*.tar"))[0]
    bad = tmp_path / "bad-000000.tar"
    jpg = next(m for m in tarfile.open(good).getmembers() if m.name.endswith(".jpg"))
    frame = tarfile.open(good).extractfile(jpg).read()
    _tar_with(bad, {
        "v1.json": b"{broken json",
        "v1.000.jpg": frame,
        "v2.json": json.dumps({"pairs": [{"id": "x", "prompt": "q", "chosen": "", "rejected": "r"},
                                         {"id": "ok", "prompt": "q", "chosen": "c",
                                          "rejected": "r"}]}).encode(),
        "v2.000.jpg": frame,
        "v3.json": json.dumps({"pairs": []}).encode(),  # no frames
    })
    rejects = Rejects(tmp_path / "rejects.jsonl")
    stream = PairStream([str(bad), str(good)], seed=0, shuffle_buffer=4, rejects=rejects)
    ids = [p.id for p in stream.take(40)]
    assert "ok" in ids and "x" not in ids
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert rejects.count == len(lines) == 3
    assert any("v1" in r["source"] for r in lines) and any("v3" in r["source"] for r in lines)


def test_stream_is_deterministic_and_resumable(demo_assets):
    urls = expand_shards(str(demo_assets / "shards" / "train-*.tar"))
    a = PairStream(urls, seed=3, shuffle_buffer=16)
    first = [p.id for p in a.take(50)]
    pos = a.position
    rest = [p.id for p in a.take(400)]  # crosses an epoch boundary
    b = PairStream(urls, seed=3, shuffle_buffer=16, position=pos)
    assert [p.id for p in b.take(400)] == rest
    assert first != [p.id for p in PairStream(urls, seed=4, shuffle_buffer=16).take(50)]


def test_missing_shards_name_the_key(tmp_path):
    from safevid.data.stream import DataError

    with pytest.raises(DataError, match="data.eval_shards"):
        expand_shards(str(tmp_path / "x-*.tar"), "data.eval_shards")


def _expected_labels(batch, enc) -> torch.Tensor:
    """Next-token targets rebuilt from the encoded pairs alone.

    Sequence 2i is pair i's prompt + chosen answer, 2i+1 its prompt + rejected answer. Each
    must sit in consecutive columns of one row; position k of a sequence is labelled with
    token k+1 when that token belongs to the answer, and with IGNORE everywhere else (the
    prompt, the video, the answer's last token, padding).
    """
    seqs = [(e.prompt + answer, len(e.prompt)) for e in enc for answer in (e.chosen, e.rejected)]
    want = torch.full_like(batch.labels, IGNORE)
    placed = []
    for r in range(batch.labels.shape[0]):
        for i in sorted(set(batch.seq_index[r].tolist()) - {-1}):
            cols = (batch.seq_index[r] == i).nonzero().squeeze(1).tolist()
            toks, start = seqs[i]
            assert cols == list(range(cols[0], cols[0] + len(toks))), (r, i)
            assert batch.input_ids[r, cols].tolist() == toks, (r, i)
            for k in range(start - 1, len(toks) - 1):
                want[r, cols[k]] = toks[k + 1]
            placed.append(i)
    assert sorted(placed) == list(range(len(seqs)))  # every sequence exactly once
    return want


def test_labels_are_the_next_answer_token(demo_assets):
    """Where the targets are, not only how many: a shift by one position keeps the count."""
    from safevid.data.collate import EncodedPair
    from safevid.models.llava_next_video import load

    m = load(str(demo_assets / "model"), 4, torch.float32, fused=True)
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "train-*.tar")), 2)
    # Hand-made tokens, so the expected rows can be written out: prompt 5 6 7, chosen 8 9,
    # rejected 10. Position p is labelled with the token at p+1 when that is an answer token.
    enc = [EncodedPair([5, 6, 7], [8, 9], [10]), EncodedPair([11, 12], [13], [14, 15, 16])]
    x = IGNORE
    packed = collate(pairs, enc, m.frames, m.video, 0, True, 4096)
    assert packed.input_ids.tolist() == [
        [5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 13, 11, 12, 14, 15, 16]]
    assert packed.labels.tolist() == [[x, x, 8, 9, x, x, x, 10, x, x, 13, x, x, 14, 15, 16, x]]
    unpacked = collate(pairs, enc, m.frames, m.video, 0, False, 4096)
    assert unpacked.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0], [11, 12, 13, 0, 0],
                                           [11, 12, 14, 15, 16]]
    assert unpacked.labels.tolist() == [[x, x, 8, 9, x], [x, x, 10, x, x], [x, 13, x, x, x],
                                        [x, 14, 15, 16, x]]
    # Real chat-template encodings (video placeholders, BOS, EOS), packed and padded, with a
    # row budget small enough that packing makes several rows.
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "train-*.tar")), 6)
    enc = [encode_pair(p, m.tokenizer, m.video, 128) for p in pairs]
    budget = 3 * max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in enc)
    for packing in (True, False):
        batch = collate(pairs, enc, m.frames, m.video, m.tokenizer.pad_token_id, packing, budget)
        rows = batch.labels.shape[0]
        assert rows > 1 if packing else rows == 12
        assert torch.equal(batch.labels, _expected_labels(batch, enc)), f"{packing=}"


def test_packed_and_unpacked_give_same_logps(demo_assets):
    from safevid.models.llava_next_video import batch_inputs, load

    m = load(str(demo_assets / "model"), 4, torch.float32, fused=True)
    m.model.eval()
    pairs = read_all_pairs(expand_shards(str(demo_assets / "shards" / "train-*.tar")), 6)
    enc = [encode_pair(p, m.tokenizer, m.video, 128) for p in pairs]
    out = {}
    for packing in (True, False):
        batch = collate(pairs, enc, m.frames, m.video, m.tokenizer.pad_token_id, packing, 4096)
        assert torch.equal(batch.labels, _expected_labels(batch, enc))
        batch = batch.to("cpu", torch.float32)
        with torch.no_grad():
            out[packing] = m.model(**batch_inputs(batch))
    assert out[True][0].shape == (12,)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[True][1], out[False][1])
