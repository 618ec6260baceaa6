"""`safevid generate captions`: real H.264 files, real HTTP, rejects, resume, import."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from openai_server import OpenAIServer
from safevid.data_prep.generate_cli import main

FAKE_KEY = "sk-test-CAPTIONKEY-51e0d2"
BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "data_prep" / "prompts" / "v1"


def caption_prompt_sha() -> str:
    """`prompt_sha` as documented, from the template files: the first 16 hex digits of sha256
    over `name NUL text` for caption_system and caption_user (text stripped), joined by NUL."""
    blob = "\x00".join(f"{n}\x00{(BUILTIN_PROMPTS / f'{n}.txt').read_text().strip()}"
                       for n in ("caption_system", "caption_user"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_video(path: Path, frames: int = 12, size: tuple[int, int] = (64, 48), seed: int = 0):
    """A tiny libx264 clip whose frames differ (a moving bar), so decoding is real work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), (seed * 60) % 256, np.uint8)
            img[:, (i * 4) % width:(i * 4) % width + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture()
def videos(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "street.mp4", seed=1)
    write_video(root / "park" / "climb.mp4", seed=2)
    write_video(root / "park" / "kitchen.mkv", seed=3)
    (root / "park" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (root / "notes.txt").write_text("not a video")
    return root


def caption_args(videos: Path, out: Path, server: OpenAIServer, *extra: str) -> list[str]:
    return ["captions", "--videos", str(videos), "--out", str(out), "--base-url",
            server.base_url, "--model", "vision-model", "--frames", "4", "--size", "32",
            "--backoff", "0.001", "--no-progress", *extra]


def test_captions_from_videos(videos, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    # Every log record, DEBUG included (retries log their errors there), is scanned for the key.
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "captions.jsonl"
    with OpenAIServer() as server:
        server.add_fault("500", times=2)  # retried transparently
        assert main(caption_args(videos, out, server)) == 0
        records = {r["id"]: r for r in lines(out)}
        assert set(records) == {"street.mp4", "park/climb.mp4", "park/kitchen.mkv"}
        # 3 videos + 2 retried requests, each with its 4 frames.
        assert server.requests == 5 and server.stats.images == 5 * 4
        assert f"Bearer {FAKE_KEY}" in server.stats.auth
        climb = records["park/climb.mp4"]
        assert climb["video"] == "park/climb.mp4" and climb["video_id"] == "park/climb"
        assert climb["caption"].startswith("A video of 4 frames")
        assert len(climb["frames"]["indices"]) == 4 and len(climb["frames"]["timestamps"]) == 4
        assert climb["frames"]["indices"] == sorted(climb["frames"]["indices"])
        prov = climb["provenance"]
        assert prov["model"] == "vision-model" and prov["prompt_sha"] == caption_prompt_sha()
        assert prov["num_frames"] == 4 and prov["size"] == 32

        rejects = lines(tmp_path / "captions.rejects.jsonl")
        assert len(rejects) == 1 and rejects[0]["key"] == "park/broken.mp4"
        assert "broken.mp4" in rejects[0]["reason"] and rejects[0]["stage"] == "frames"
        assert len(records) + len(rejects) == 4  # inputs = written + rejected

        sent = server.requests
        assert main(caption_args(videos, out, server)) == 0  # rerun: all done, nothing sent
        assert server.requests == sent and len(lines(out)) == 3
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    printed = capsys.readouterr()
    assert "safevid" in caplog.text or printed.err, "nothing was logged: the scan proves nothing"
    for where, text in (("stdout", printed.out), ("stderr", printed.err), ("log", caplog.text)):
        assert FAKE_KEY not in text, where


def test_retryable_failure_is_retried_on_rerun(videos, tmp_path):
    out = tmp_path / "captions.jsonl"
    with OpenAIServer() as server:
        server.add_fault("500", times=None)
        assert main(caption_args(videos, out, server, "--max-retries", "1")) == 75
        rejects = lines(tmp_path / "captions.rejects.jsonl")
        assert sorted(r["retryable"] for r in rejects) == [False, True, True, True]
        server.reset()
        assert main(caption_args(videos, out, server)) == 0
        assert len(lines(out)) == 3
        rejects = lines(tmp_path / "captions.rejects.jsonl")
        assert [r["key"] for r in rejects] == ["park/broken.mp4"]  # retryable ones removed


def test_import_captions_with_field_mapping(tmp_path, videos):
    src = tmp_path / "external.jsonl"
    rows = [
        {"clip": "street", "path": "street.mp4", "meta": {"text": "A busy street at night."}},
        {"clip": "climb", "path": "park/climb.mp4", "meta": {"text": "Someone climbs a mast."}},
        {"clip": "nothing", "path": "street.mp4", "meta": {}},
        {"clip": "street", "path": "street.mp4", "meta": {"text": "Duplicate id."}},
        {"clip": "ghost", "path": "missing.mp4", "meta": {"text": "No such file."}},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"clip": "torn", "pa')
    out = tmp_path / "imported.jsonl"
    args = ["captions", "--from", str(src), "--field", "id=clip", "--field", "video=path",
            "--field", "caption=meta.text", "--videos", str(videos), "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    records = lines(out)
    assert [r["id"] for r in records] == ["street", "climb"]
    assert records[1]["caption"] == "Someone climbs a mast." and records[1]["video"] == (
        "park/climb.mp4")
    assert records[1]["provenance"]["imported_from"] == str(src)
    rejects = lines(tmp_path / "imported.rejects.jsonl")
    reasons = " | ".join(r["reason"] for r in rejects)
    assert len(rejects) == 4 and len(records) + len(rejects) == 6
    for expected in ("no caption", "duplicate id 'street'", "missing.mp4 does not exist",
                     "not a JSON object"):
        assert expected in reasons
    assert main(args) == 0 and len(lines(out)) == 2  # idempotent


def test_bad_field_mapping_is_a_usage_error(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text("{}\n")
    code = main(["captions", "--from", str(src), "--field", "colour=x", "--out",
                 str(tmp_path / "o.jsonl"), "--no-progress"])
    assert code == 2


def test_torn_last_line_is_redone_once(videos, tmp_path):
    out = tmp_path / "captions.jsonl"
    with OpenAIServer() as server:
        assert main(caption_args(videos, out, server, "--no-cache")) == 0
        data = out.read_bytes()
        last = data.splitlines()[-1]
        out.write_bytes(data[: len(data) - len(last) // 2 - 1])  # a write cut short
        sent = server.requests
        assert main(caption_args(videos, out, server, "--no-cache")) == 0
        assert server.requests == sent + 1  # only the torn video is captioned again
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == ["park/climb.mp4", "park/kitchen.mkv", "street.mp4"]


def test_plain_text_refusal_is_rejected_not_kept(videos, tmp_path):
    out = tmp_path / "captions.jsonl"
    with OpenAIServer() as server:
        server.add_fault("reply", reply="I'm sorry, but I can't describe this video.")
        assert main(caption_args(videos, out, server, "--concurrency", "1")) == 0
    rejects = [r for r in lines(tmp_path / "captions.rejects.jsonl") if r["stage"] == "caption"]
    assert len(lines(out)) == 2 and len(rejects) == 1
    assert "too short to be a description" in rejects[0]["reason"]
    assert not rejects[0]["retryable"]
