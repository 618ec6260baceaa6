"""Crash safety: SIGKILL a real `safevid generate pairs` process mid-run, tear its last lines,
rerun, and check that every item is there exactly once, as in an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from openai_server import Fault, OpenAIServer
from safevid.data_prep.generate_cli import main

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-test-RESUMEKEY-9d1e77"
FAIL_VERDICT = {"chosen_safe": True, "chosen_helpful": False, "chosen_grounded": True,
                "rejected_worse": True, "rejected_non_actionable": True,
                "reason": "the chosen answer refuses a harmless question"}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_captions(path: Path, n: int) -> None:
    rows = [{"id": f"v{i:03d}", "video": f"v{i:03d}.mp4",
             "caption": f"Video {i}: teenagers set off fireworks in a crowded street. K{i:03d}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "v999", "capt')


def args(captions: Path, out: Path, server: OpenAIServer) -> list[str]:
    return ["pairs", "--captions", str(captions), "--out", str(out), "--base-url",
            server.base_url, "--model", "m", "--max-categories", "2", "--concurrency", "4",
            "--backoff", "0.001", "--no-progress"]


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OPENAI_API_KEY=FAKE_KEY, PYTHONUNBUFFERED="1")
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "safevid", "generate", *argv], cwd=REPO,
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, out: Path, min_lines: int, timeout: float = 60) -> bool:
    """SIGKILL `proc` once `out` holds `min_lines` lines; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if out.exists() and out.read_bytes().count(b"\n") >= min_lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("generation made no progress")


def test_sigkill_and_torn_lines_resume_exactly_once(tmp_path):
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 40)
    with OpenAIServer(latency=0.01) as server:
        # Two videos whose every pair is dropped (failed check, refused answer), so the rejects
        # file has both input-level and item-level lines to keep straight.
        server.add_fault(Fault("reply", match="K007", schema="verify", times=None,
                               reply=FAIL_VERDICT))
        server.add_fault(Fault("refusal", match="K011", schema="chosen", times=None))

        ref = tmp_path / "ref" / "pairs.jsonl"
        assert main(args(captions, ref, server)) == 0
        full = server.requests

        out = tmp_path / "run" / "pairs.jsonl"
        rejects = out.with_name("pairs.rejects.jsonl")
        log = tmp_path / "run.log"
        kills = 0
        for min_lines in (40, 110, 170):
            if kill_when(start(args(captions, out, server), log), out, min_lines):
                kills += 1
            if kills == 2:  # tear the last record in half, as a write cut short would
                data = out.read_bytes()
                out.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])
        assert kills >= 2, log.read_text()[-3000:]
        with open(out, "ab") as f:
            f.write(b'{"id": "pair-torn", "prompt": "half a li')
        with open(rejects, "ab") as f:
            f.write(b'{"id": "rej-torn", "key"')

        before = server.requests
        final = start(args(captions, out, server), log)
        assert final.wait(120) == 0, log.read_text()[-3000:]
        resumed = server.requests - before

    pairs, expected = lines(out), lines(ref)
    ids = Counter(p["id"] for p in pairs)
    assert max(ids.values()) == 1, "duplicated pairs"
    assert set(ids) == {p["id"] for p in expected}, "lost or unexpected pairs"
    groups = Counter(p["provenance"]["caption_id"] for p in pairs)
    assert all(groups[p["provenance"]["caption_id"]] == p["provenance"]["caption_pairs"]
               for p in pairs)
    got, want = lines(rejects), lines(ref.with_name("pairs.rejects.jsonl"))
    assert Counter(r["id"] for r in got) == Counter(r["id"] for r in want)
    assert {r["key"] for r in got if r["level"] == "input"} == {"v007", "v011",
                                                                  f"{captions}:41"}
    assert sum(r["level"] == "item" for r in got) == 12
    # Inputs = written + rejected: 40 captions and one torn line.
    assert len(groups) + sum(r["level"] == "input" for r in got) == 41
    # The killed runs' calls were cached: resuming cost far less than starting again.
    assert resumed < full / 2
    text = log.read_text()
    assert "removed" in text and FAKE_KEY not in text
    for path in out.parent.iterdir():
        assert FAKE_KEY.encode() not in path.read_bytes(), path
