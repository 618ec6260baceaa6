"""`safevid prepare` at scale: real H.264 files written by PyAV whose frames encode their own
index, hostile file names, every bad-input kind, the seeded order, job arrays and resume."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safevid.data_prep.keys import sample_key
from safevid.data_prep.prepare import main as prepare_main
from safevid.data_prep.synthetic import write_video

from safevid.data.stream import expand_shards, read_all_pairs

FPS = 8


def _indexed_video(path: Path, frames: int = 24, width: int = 64, height: int = 48) -> Path:
    """Frame i is a flat grey of level 8 * i: the decoded level says which frame it was."""
    levels = (np.arange(frames) * 8).astype(np.uint8)
    data = np.broadcast_to(levels[:, None, None, None], (frames, height, width, 3)).copy()
    return write_video(data, path, fps=FPS)


def _frame_index(jpeg: bytes) -> int:
    from safevid.data_prep.frames import decode_jpeg

    return round(float(decode_jpeg(jpeg).mean()) / 8)


def _pairs_file(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pair(i, video, **kw) -> dict:
    return {"id": f"p{i}", "video": video, "prompt": f"What happens in scene {i}?",
            "chosen": "A safe answer.", "rejected": "An unsafe answer.", **kw}


def _run(tmp_path, videos, rows, *extra, out="shards") -> tuple[int, Path]:
    pairs = _pairs_file(tmp_path / "pairs.jsonl", rows)
    out_dir = tmp_path / out
    rc = prepare_main(["--videos", str(videos), "--pairs", str(pairs), "--out", str(out_dir),
                       "--frames", "4", "--size", "32", "--videos-per-shard", "2", "--workers", "2",
                       "--no-progress", *extra])
    return rc, out_dir


def _members(out_dir: Path) -> dict[str, bytes]:
    found = {}
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                found[f"{shard.name}/{m.name}"] = tar.extractfile(m).read()
    return found


def test_sampling_hostile_names_and_every_bad_input(tmp_path):
    videos = tmp_path / "videos"
    names = ["clip.v2.mp4", "a/x.mp4", "b/x.mp4", "vidéo ünïcode.mp4", "plain.mp4"]
    for name in names:
        _indexed_video(videos / name)
    _indexed_video(videos / "short.mp4", frames=2)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.mp4").write_text("this is not a video\n")
    good = (videos / "plain.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(good[: len(good) // 3])
    rows = [_pair(i, name) for i, name in enumerate(names)]
    rows += [_pair(10, "empty.mp4"), _pair(11, "text.mp4"), _pair(12, "truncated.mp4"),
             _pair(13, "missing.mp4"), _pair(14, "../outside.mp4"), _pair(15, "/etc/passwd"),
             _pair(16, "short.mp4"), "{not json", {"id": "p17", "video": "plain.mp4"}]
    rc, out = _run(tmp_path, videos, rows, "--short-videos", "reject")
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["totals"] == {"videos": 5, "pairs": 5, "rejected": 9, "inputs": 14}
    reasons = {r.get("id", r["source"]): r["reason"]
               for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert "empty file" in reasons["p10"]
    assert "cannot decode" in reasons["p11"] and "cannot decode" in reasons["p12"]
    assert reasons["p13"].endswith("not found")
    assert "contains '..'" in reasons["p14"] and "is absolute" in reasons["p15"]
    assert "only 2 decodable frames, 4 asked" in reasons["p16"]
    assert any("invalid JSON" in r for r in reasons.values())
    assert "missing fields" in reasons["p17"]
    # Every name trains: keys are safe and distinct, and the stream reads every pair.
    pairs = read_all_pairs(expand_shards(str(out / "train-*.tar")), 100)
    assert sorted(p.id for p in pairs) == [f"p{i}" for i in range(5)]
    keys = {p.video.key for p in pairs}
    assert keys == {sample_key(n) for n in names} and len(keys) == 5
    assert all("." not in k for k in keys)
    # Uniform sampling, segment centres of 24 frames: 3, 9, 15, 21.
    for p in pairs:
        assert [_frame_index(j) for j in p.video.jpegs] == [3, 9, 15, 21]
        assert p.video.meta["frame_indices"] == [3, 9, 15, 21]
        assert p.video.meta["timestamps"] == [i / FPS for i in (3, 9, 15, 21)]


def test_fps_sampling_and_aspect(tmp_path):
    videos = tmp_path / "videos"
    _indexed_video(videos / "v.mp4", frames=24)  # 3 s at 8 fps
    rc, out = _run(tmp_path, videos, [_pair(0, "v.mp4")], "--fps", "2", "--frames", "16",
                   "--keep-aspect")
    assert rc == 0
    (pair,) = read_all_pairs(expand_shards(str(out / "train-*.tar")), 10)
    # 2 fps over 3 s: 6 frames at the centres of half-second intervals; shorter side 32.
    assert pair.video.meta["frame_indices"] == [2, 6, 10, 14, 18, 22]
    assert [_frame_index(j) for j in pair.video.jpegs] == [2, 6, 10, 14, 18, 22]
    assert pair.video.frames().shape == (6, 32, 43, 3)
    # A pixel budget under shorter-side-32 (32 x 43 = 1376): the aspect ratio stays.
    rc, out = _run(tmp_path, videos, [_pair(0, "v.mp4")], "--keep-aspect", "--max-pixels", "768",
                   out="budget")
    (pair,) = read_all_pairs(expand_shards(str(out / "train-*.tar")), 10)
    h, w = pair.video.frames().shape[1:3]
    assert h * w <= 768 and abs(w / h - 4 / 3) < 0.05


def _many(tmp_path, n=9) -> tuple[Path, list[dict]]:
    videos = tmp_path / "videos"
    rows = []
    for i in range(n):
        # Sorted by category on disk: a path-ordered writer would fill shards by category.
        name = f"{'cat_a' if i < n // 2 else 'cat_b'}/v{i}.mp4"
        _indexed_video(videos / name, frames=8)
        rows += [_pair(2 * i, name), _pair(2 * i + 1, name)]
    return videos, rows


def test_seeded_order_job_array_merge_and_resume(tmp_path, monkeypatch):
    videos, rows = _many(tmp_path)
    rc, single = _run(tmp_path, videos, rows, out="single")
    assert rc == 0
    mixed = [len({p.video.meta["source"].split("/")[0] for p in read_all_pairs([str(t)], 100)})
             for t in sorted(single.glob("train-*.tar"))]
    assert max(mixed) == 2  # a shard holds both categories
    order = [json.loads(m)["source"] for name, m in _members(single).items()
             if name.endswith(".json")]
    assert order != sorted(order)  # seeded, not path order
    # The same inputs and settings: the same bytes.
    assert _run(tmp_path, videos, rows, out="again")[0] == 0
    assert _members(tmp_path / "again") == _members(single)

    # A Slurm job array of 3 numbered 1-3 (`sbatch --array=1-3`): each task its own shards,
    # then the merge. Task 2 fails; it is run again alone (`sbatch --array=2`, which Slurm
    # reports as an array of one task) and does the earlier array's job 1, as it did first.
    def slurm(task: int, count: int, first: int) -> None:
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(count))
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", str(first))

    for task in (1, 3):
        slurm(task, 3, 1)
        assert _run(tmp_path, videos, rows, out="array")[0] == 0
    array = tmp_path / "array"
    with pytest.raises(SystemExit, match=r"train-000001.tar \(job 1\)"):
        prepare_main(["--merge", "--out", str(array)])
    assert not (array / "index.json").exists()
    slurm(2, 1, 2)
    assert _run(tmp_path, videos, rows, out="array")[0] == 0
    assert sorted(p.name for p in (array / ".parts").glob("job-*")) == [
        "job-0-of-3.json", "job-1-of-3.json", "job-2-of-3.json"]
    slurm(7, 1, 7)  # no such task in the earlier array: refused, nothing written
    assert _run(tmp_path, videos, rows, out="array")[0] == 2
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name)
    assert prepare_main(["--merge", "--out", str(array)]) == 0
    assert _members(array) == _members(single)
    assert json.loads((array / "index.json").read_text())["totals"] == \
        json.loads((single / "index.json").read_text())["totals"]

    # Resume: a rerun skips recorded shards; a shard without its record (a crash before the
    # record) is written again, and a leftover .tmp is never counted.
    stamp = {p.name: p.stat().st_mtime_ns for p in array.glob("*.tar")}
    (array / ".parts" / "train-000002.tar.json").unlink()
    (array / "train-000003.tar.tmp").write_bytes(b"half a shard")
    assert _run(tmp_path, videos, rows, "--job-index", "2", "--num-jobs", "3", out="array")[0] == 0
    after = {p.name: p.stat().st_mtime_ns for p in array.glob("*.tar")}
    assert after["train-000000.tar"] == stamp["train-000000.tar"]
    assert after["train-000002.tar"] != stamp["train-000002.tar"]
    assert prepare_main(["--merge", "--out", str(array)]) == 0
    assert _members(array) == _members(single)

    # A pair's text fixed in place (same id), then a rerun: only the shard that holds it is
    # written again, with the new text; a kept old shard would train on the old one.
    def holder(out: Path) -> str:
        return next(n.split("/")[0] for n, data in _members(out).items()
                    if n.endswith(".json") and "p0" in {p["id"] for p in json.loads(data)["pairs"]})

    stamp = {p.name: p.stat().st_mtime_ns for p in single.glob("*.tar")}
    edited = [dict(r, chosen="A corrected answer.") if r["id"] == "p0" else r for r in rows]
    assert _run(tmp_path, videos, edited, out="single")[0] == 0
    after = {p.name: p.stat().st_mtime_ns for p in single.glob("*.tar")}
    assert {n for n in stamp if after[n] != stamp[n]} == {holder(single)}
    assert b"A corrected answer." in b"".join(_members(single).values())


def test_videos_from_a_list_file(tmp_path):
    videos = tmp_path / "videos"
    for name in ("a/one.mp4", "b/two.mp4", "c/three.mp4", "d/Episode #4.mp4"):
        _indexed_video(videos / name, frames=8)
    listing = videos / "list.txt"
    # '#' starts a comment at the start of a line or after a space, not inside a name; `./`
    # spellings name the same file as in the pairs.
    listing.write_text("# the clips to use\na/one.mp4\n./b/two.mp4  # this one too\n"
                       "d/Episode #4.mp4\n")
    rows = [_pair(0, "a/one.mp4"), _pair(1, "b/two.mp4"), _pair(2, "c/three.mp4"),
            _pair(3, "./d/Episode #4.mp4")]
    pairs = _pairs_file(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "shards"
    assert prepare_main(["--videos", str(listing), "--pairs", str(pairs), "--out", str(out),
                         "--frames", "4", "--size", "32", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["totals"] == {"videos": 3, "pairs": 3, "rejected": 1, "inputs": 4}
    (reject,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["id"] == "p2" and "not in the --videos list" in reject["reason"]


def test_video_ids_name_one_video_and_paths_stay_inside(tmp_path):
    from safevid.data_prep.keys import UnsafePath
    from safevid.data_prep.prepare import _video_relpath

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip [hd].mkv").write_bytes(b"x")
    (videos / "other.mp4").write_bytes(b"x")
    assert _video_relpath(videos, {"video_id": "clip [hd]"}) == "clip [hd].mkv"
    assert _video_relpath(videos, {"video_id": "*"}) == "*.mp4"  # no file: "not found" later
    # Only video files named exactly so: not subtitles or metadata beside it, nor another
    # video whose name starts alike; two videos of one name are refused as ambiguous.
    for name in ("abc.en.vtt", "abc.info.json", "abc.mp4", "abc.v2.mp4", "two.mp4", "two.webm"):
        (videos / name).write_bytes(b"x")
    assert _video_relpath(videos, {"video_id": "abc"}) == "abc.mp4"
    with pytest.raises(UnsafePath, match="names 2 videos"):
        _video_relpath(videos, {"video_id": "two"})
    # A link inside the directory is followed (a hub snapshot links every file into blobs/);
    # a path in the pairs that climbs out is refused.
    outside = tmp_path / "blobs" / "0a1b2c"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    (videos / "link.mp4").symlink_to(outside)
    assert _video_relpath(videos, {"video_id": "link"}) == "link.mp4"
    for bad in ("../outside.mp4", "/etc/passwd", "a/../../b.mp4"):
        with pytest.raises(UnsafePath, match="outside the video directory"):
            _video_relpath(videos, {"video": bad})


def test_a_rerun_with_other_settings_rewrites_its_shards(tmp_path):
    videos, rows = _many(tmp_path, n=4)
    assert _run(tmp_path, videos, rows, out="x")[0] == 0
    first = _members(tmp_path / "x")
    assert _run(tmp_path, videos, rows, "--jpeg-quality", "50", out="x")[0] == 0
    second = _members(tmp_path / "x")
    assert second.keys() == first.keys() and second != first  # rewritten, not kept
    index = json.loads((tmp_path / "x" / "index.json").read_text())
    assert index["frames"]["jpeg_quality"] == 50
    # A job of an array with other settings next to them: the merge refuses to mix them.
    assert _run(tmp_path, videos, rows, "--job-index", "0", "--num-jobs", "2", out="x")[0] == 0
    with pytest.raises(SystemExit, match="disagree"):
        prepare_main(["--merge", "--out", str(tmp_path / "x")])


def test_a_video_that_kills_its_decoder_is_rejected_and_the_job_goes_on(tmp_path, monkeypatch):
    """A crash inside the decoder (a segfault on a corrupt file, a kill for memory) takes its
    process and the whole pool down, and every video in flight with it. No real file crashes
    the decoders here on purpose, so a test hook makes one file do so: only that video's pairs
    are rejected, naming it, every other video is written, and the job ends normally."""
    videos, rows = _many(tmp_path, n=6)
    monkeypatch.setenv("SAFEVID_TEST_DECODER_CRASH", "cat_b/v3.mp4")
    rc, out = _run(tmp_path, videos, rows, out="crash")
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["totals"] == {"videos": 5, "pairs": 10, "rejected": 2, "inputs": 12}
    rejected = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejected) == ["p6", "p7"]
    assert all("cat_b/v3.mp4: the decoding process died" in r["reason"] for r in rejected)


def test_array_job_places_slurm_tasks(monkeypatch):
    """A task's job is its place in its array (first id, step); a task run again alone, or a
    few tasks not from the start, keep the earlier array's shape; a new smaller array keeps
    its own; a split given by hand is never recorded as an array."""
    from safevid.data_prep.jobs import Earlier, array_job

    def slurm(task, count, first, last, step=1):
        for name, value in (("ID", task), ("COUNT", count), ("MIN", first), ("MAX", last),
                            ("STEP", step)):
            monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", str(value))

    assert array_job(None, None) == (0, 1, None)
    assert array_job(2, 5) == (2, 5, None)
    slurm(2, 3, 1, 3)  # --array=1-3
    assert array_job(None, None) == (1, 3, Earlier(3, 1, 1))
    slurm(4, 4, 0, 6, 2)  # --array=0-6:2
    assert array_job(None, None) == (2, 4, Earlier(4, 0, 2))
    slurm(2, 1, 2, 2)  # --array=2 after --array=1-3
    assert array_job(None, None, Earlier(3, 1, 1)) == (1, 3, Earlier(3, 1, 1))
    slurm(0, 1, 0, 0)  # --array=0 after --array=0-15
    assert array_job(None, None, Earlier(16, 0, 1)) == (0, 16, Earlier(16, 0, 1))
    slurm(9, 2, 3, 9)  # --array=3,9 after --array=0-15
    assert array_job(None, None, Earlier(16, 0, 1)) == (9, 16, Earlier(16, 0, 1))
    slurm(3, 4, 0, 3)  # --array=0-3 after --array=0-31: the first four run again
    assert array_job(None, None, Earlier(32, 0, 1)) == (3, 32, Earlier(32, 0, 1))
    assert array_job(1, 3, Earlier(16, 0, 1)) == (1, 3, None)  # by hand
    slurm(2, 3, 1, 3)  # --array=1-3 with --num-jobs 3: the array still places the task
    assert array_job(None, 3) == (1, 3, Earlier(3, 1, 1))
    slurm(3, 2, 0, 6, 6)
    with pytest.raises(ValueError, match="not in the array"):
        array_job(None, None)
