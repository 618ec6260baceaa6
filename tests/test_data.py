"""Shards and the pair stream: real H.264 files decoded by decord, real tar shards.
(Collation and row layouts: test_layouts.py.)"""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from safevid.data_prep.prepare import main as prepare_main
from safevid.data_prep.rejects import Rejects
from safevid.data_prep.synthetic import draw_scene, write_video

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
    assert "empty fields: chosen" in reasons and "invalid JSON" in reasons
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


def test_rank_rejects_files_merge_into_one_file_once_per_input(tmp_path, capsys):
    """Each rank writes its own file; the merge keeps every record (rank order, numerically),
    each input once per reason, leaves out (and prints) a line cut short by a killed writer,
    and removes the rank files."""
    from safevid.data_prep.rejects import merge_rank_files, rank_file

    path = tmp_path / "rejects.jsonl"
    path.write_text(json.dumps({"source": "a", "reason": "r"}) + "\n")  # an earlier start's
    for rank, sources in ((10, ["d"]), (2, ["a", "c"]), (0, ["b"])):
        part = Rejects(rank_file(path, rank), tags={"rank": rank})
        for source in sources:
            part.add(source, "r")
    assert rank_file(path, 2).name == "rejects.rank2.jsonl"
    with open(rank_file(path, 10), "a") as f:
        f.write('{"source": "e", "rea')  # a writer killed mid-line
    Rejects(rank_file(path, 10)).add("f", "r")  # the next start of rank 10: a line of its own
    other = tmp_path / "rejects.rank1.jsonl.tmp"
    other.write_text("not a rank file\n")
    assert merge_rank_files(path) == 5
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["source"] for r in records] == ["a", "b", "c", "d", "f"]
    assert [r.get("rank") for r in records] == [None, 0, 2, 10, None]
    assert '{"source": "e", "rea' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rejects.jsonl", other.name]
    assert merge_rank_files(path) == 5  # nothing more to fold: the same count
