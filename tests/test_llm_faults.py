"""Broken responses against a real HTTP server: the client retries each like a 5xx, then raises
an `LLMError` naming it, and a generation job rejects only the input it hit and goes on."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from openai_server import Fault, OpenAIServer
from safevid.data_prep.generate_cli import EXIT_RETRY, main

from safevid.llm_client import (
    LLMClient,
    LLMError,
    LLMMalformedResponse,
    LLMUnavailable,
    ResponseCache,
)

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-test-FAULTKEY-5a17e0"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}},
          "required": ["answer"], "additionalProperties": False}
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}

# Each kind of unreadable HTTP 200, and the words the final error must say about it.
MALFORMED = {
    "truncated": (Fault("truncated"), "body is not JSON"),
    "empty": (Fault("empty"), "empty body"),
    "html": (Fault("html"), r"body is not JSON .*text/html"),
    "bad_utf8": (Fault("bad_utf8"), "body is not UTF-8"),
    "no_choices": (Fault("body", body={"object": "chat.completion", "usage": USAGE}),
                   "no `choices`"),
    "empty_choices": (Fault("body", body={"choices": [], "usage": USAGE}), r"`choices` is \[\]"),
    "error_object": (Fault("body", body={"error": {"message": "upstream overloaded"}}),
                     "error object instead of a completion.*upstream overloaded"),
    "message_null": (Fault("body", body={"choices": [{"message": None}]}), "no message object"),
    "content_number": (Fault("body", body={"choices": [{"message": {"content": 42}}]}),
                       "`content` is a number"),
    "refusal_number": (Fault("body", body={"choices": [{"message": {"refusal": 7}}]}),
                       "`refusal` is a number"),
    "array_body": (Fault("body", body=[]), "body is an array"),
    "deep_body": (Fault("body", body="[" * 100_000 + "]" * 100_000), "body is not JSON"),
}
# Connection faults in the middle of a body: retried as connection errors, named by their cause.
TRANSPORT = {
    "cut": (Fault("cut"), "RemoteProtocolError"),
    "gzip": (Fault("gzip"), "DecodingError"),
}
FAULTS = {**MALFORMED, **TRANSPORT}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def run(server: OpenAIServer, calls, **kwargs):
    """Run `calls(client)` with a fresh client; tiny backoff so no test waits on it."""
    opts = dict(model="test-model", api_key=FAKE_KEY, backoff_base=0.001, backoff_max=0.01,
                timeout=5.0, max_retries=2)
    opts.update(kwargs)

    async def go():
        async with LLMClient(server.base_url, **opts) as client:
            return await calls(client), client.stats

    return asyncio.run(go())


def fault(name: str, times: int | None) -> Fault:
    base = FAULTS[name][0]
    return Fault(base.kind, body=base.body, times=times)


@pytest.fixture()
def server():
    with OpenAIServer() as s:
        yield s


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_fault_once_is_retried_and_the_call_succeeds(server, tmp_path, name):
    cache = tmp_path / "cache.sqlite"
    server.add_fault(fault(name, times=1))
    result, stats = run(server, lambda c: c.chat(ask("x"), SCHEMA), cache_path=cache)
    assert isinstance(result.content["answer"], str)
    assert server.requests == 2 and stats.requests == 2 and stats.retries == 1
    assert stats.malformed == (name in MALFORMED) and stats.failures == 0
    # Only the good answer was cached: a rerun sends nothing.
    again, stats = run(server, lambda c: c.chat(ask("x"), SCHEMA), cache_path=cache)
    assert again.cached and again.content == result.content and server.requests == 2


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_lasting_fault_raises_an_llm_error_that_names_it(server, tmp_path, name):
    cache = tmp_path / "cache.sqlite"
    server.add_fault(fault(name, times=None))
    for schema in (SCHEMA, None):  # JSON results and plain text take the same path
        with pytest.raises(LLMError, match=FAULTS[name][1]) as info:
            run(server, lambda c, s=schema: c.chat(ask("x"), s), cache_path=cache)
        expected = LLMMalformedResponse if name in MALFORMED else LLMUnavailable
        assert type(info.value) is expected, repr(info.value)
        assert info.value.retryable and "gave up after 3 attempts" in str(info.value)
    assert server.requests == 6  # 1 + max_retries, twice
    assert len(ResponseCache(cache)) == 0  # a failed call is never cached
    _, stats = run(server, lambda c: asyncio.gather(
        *(c.chat(ask(f"q{i}")) for i in range(3)), return_exceptions=True))
    assert stats.failures == 3 and stats.retries == 6 and stats.requests == 9
    assert stats.malformed == (9 if name in MALFORMED else 0)


def test_good_json_with_a_wrong_content_type_is_read(server):
    server.add_fault("wrong_type")
    result, stats = run(server, lambda c: c.chat(ask("x"), SCHEMA))
    assert isinstance(result.content["answer"], str) and stats.retries == 0


def test_the_last_fault_decides_the_error(server):
    server.add_fault("500", times=2)
    server.add_fault("truncated")
    with pytest.raises(LLMMalformedResponse, match="body is not JSON"):
        run(server, lambda c: c.chat(ask("x")))
    server.add_fault("truncated", times=2)
    server.add_fault("500")
    with pytest.raises(LLMUnavailable, match="HTTP 500") as info:
        run(server, lambda c: c.chat(ask("y")))
    assert not isinstance(info.value, LLMMalformedResponse)


def test_lone_surrogates_become_replacement_characters(server, tmp_path):
    # A `\ud800` escape from the server, and one in the request (read from an input file):
    # neither can be written as UTF-8, so each is replaced and the call goes through and caches.
    cache = tmp_path / "cache.sqlite"
    server.add_fault("surrogate", times=2)
    result, _ = run(server, lambda c: c.chat(ask("bad \ud800 input"), SCHEMA), cache_path=cache)
    assert "\ufffd" in result.content["answer"] and "\ufffd" in result.text
    text, _ = run(server, lambda c: c.chat(ask("text")), cache_path=cache)
    assert text.content.startswith("\ufffd") and "\ufffd" in text.text
    assert len(ResponseCache(cache)) == 2


# ---- whole jobs ----------------------------------------------------------------------------------
def write_captions(path: Path, n: int) -> None:
    rows = [{"id": f"c{i:03d}", "video": f"c{i:03d}.mp4",
             "caption": f"Clip {i}: a person climbs a transmission tower at dusk without any "
                        f"harness while friends film from below. Marker M{i:03d}."}
            for i in range(n)]
    rows[3]["caption"] += " A sign reads \ud800."  # a lone surrogate escape in the input file
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def summary(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        key, sep, value = line.rpartition("  ")
        if sep and key.strip():
            rows[key.strip()] = value.strip()
    return rows


def test_pairs_job_rejects_only_the_caption_with_broken_responses(server, tmp_path):
    captions, out = tmp_path / "captions.jsonl", tmp_path / "pairs.jsonl"
    write_captions(captions, 5)
    server.add_fault("truncated", match="Marker M001", times=None)
    server.add_fault("surrogate", match="Marker M003", schema="chosen", times=None)
    argv = ["pairs", "--captions", str(captions), "--out", str(out), "--base-url",
            server.base_url, "--model", "gen-model", "--max-categories", "2", "--max-retries",
            "2", "--backoff", "0.001", "--backoff-max", "0.01", "--no-progress"]
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY)
    done = subprocess.run([sys.executable, "-m", "safevid", "generate", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    # 75: finished, with one input left to a rerun (not 2, and nothing lost).
    assert done.returncode == EXIT_RETRY, done.stdout + done.stderr
    pairs = lines(out)
    assert len(pairs) == 4 * 2 * 3
    assert {p["provenance"]["caption_id"] for p in pairs} == {"c000", "c002", "c003", "c004"}
    assert all("\ufffd" in p["chosen"] for p in pairs if p["provenance"]["caption_id"] == "c003")
    [reject] = lines(tmp_path / "pairs.rejects.jsonl")
    assert reject["key"] == "c001" and reject["level"] == "input" and reject["retryable"]
    assert reject["stage"] == "categorize"
    assert "LLMMalformedResponse" in reject["reason"] and "body is not JSON" in reject["reason"]
    rows = summary(done.stdout)
    assert rows["inputs processed now"] == "5" and rows["written"] == "4"
    assert rows["rejected"] == "1 (retryable 1)" and rows["check: written + rejected"] == "ok"
    assert rows["pairs written now"] == "24" and rows["malformed responses"] == "3"
    assert rows["failed"] == "1"
    # The endpoint recovers: a rerun finishes the rejected caption and nothing else.
    server.reset()
    assert main(argv) == 0
    assert len(lines(out)) == 5 * 2 * 3 and lines(tmp_path / "pairs.rejects.jsonl") == []
    assert server.stats.by_schema["categorize"] == 1


def write_video(path: Path, seed: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            img = np.full((32, 32, 3), seed * 60, np.uint8)
            img[:, i * 4:i * 4 + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_captions_job_rejects_only_the_video_with_broken_responses(server, tmp_path):
    videos, out = tmp_path / "videos", tmp_path / "captions.jsonl"
    videos.mkdir()
    for i in range(3):
        write_video(videos / f"v{i}.mp4", seed=i)
    # One video at a time, so the first three requests are all v0's: each gets an HTML page.
    server.add_fault("html", times=3)
    argv = ["captions", "--videos", str(videos), "--out", str(out), "--base-url",
            server.base_url, "--model", "vision-model", "--frames", "2", "--size", "32",
            "--min-words", "3", "--concurrency", "1", "--window", "1", "--max-retries", "2",
            "--backoff", "0.001", "--backoff-max", "0.01", "--no-progress"]
    assert main(argv) == EXIT_RETRY
    assert [r["id"] for r in lines(out)] == ["v1.mp4", "v2.mp4"]
    [reject] = lines(tmp_path / "captions.rejects.jsonl")
    assert reject["key"] == "v0.mp4" and reject["retryable"] and reject["stage"] == "caption"
    assert "LLMMalformedResponse" in reject["reason"] and "text/html" in reject["reason"]


def test_imported_caption_with_a_lone_surrogate_is_written(tmp_path):
    # The JSONL we import holds a `\ud800` escape; the line is written with ASCII escapes
    # (the same value) instead of failing the UTF-8 write and ending the job.
    theirs, out = tmp_path / "theirs.jsonl", tmp_path / "captions.jsonl"
    theirs.write_text(json.dumps({"id": "a", "caption": "a sign reads \ud800 here"}) + "\n"
                      + json.dumps({"id": "b", "caption": "a plain caption"}) + "\n")
    assert main(["captions", "--from", str(theirs), "--out", str(out), "--no-progress"]) == 0
    assert [r["caption"] for r in lines(out)] == ["a sign reads \ud800 here", "a plain caption"]
