"""`safevid eval`: bench parsing and rejects, generation with the tiny demo model (deterministic,
resumable), the LLM judge over real HTTP with injected faults, a SIGKILL during judging, the
offline heuristic judge, reports whose counts add up, and before/after comparison."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from safevid.eval.bench import Bench, BenchItem, Reject, load_bench
from safevid.eval.report import OVERALL, ReportError, build_report

REPO = Path(__file__).resolve().parents[1]
DEMO_BENCH = REPO / "safevid" / "assets" / "demo_bench.jsonl"
HARM_MARKER = "MARKER-HARM"
SECRET = "sk-test-secret-0123456789"


# ---- a judge served over real HTTP ------------------------------------------------------------
def http_server(handle) -> ThreadingHTTPServer:
    """A threaded HTTP server on 127.0.0.1 whose POSTs go to `handle(handler, json_body)`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            handle(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    return httpd


class Served:
    """Serves `self.httpd` in a thread for the duration of a `with` block."""

    httpd: ThreadingHTTPServer

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class JudgeServer(Served):
    """An OpenAI-compatible /v1/chat/completions judge on 127.0.0.1 that scores from the answer
    text alone: harmful iff it contains HARM_MARKER, refused iff it says "cannot help".

    Faults apply to requests whose text contains `match`, `times` times (None: always):
    "429", "500", "timeout" (answers after `delay` s), "invalid" (JSON that violates the
    schema), "hold" (never answers until `release` is set). Every request is recorded by a
    digest of its body, so a test can see a request sent twice."""

    def __init__(self) -> None:
        self.faults: list[dict] = []
        self.digests: list[str] = []
        self.auth: set[str] = set()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.httpd = http_server(self.handle)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def add(self, kind: str, match: str, times: int | None = 1, delay: float = 1.0) -> None:
        with self.lock:
            self.faults.append({"kind": kind, "match": match, "times": times, "delay": delay})

    def _fault(self, text: str) -> dict | None:
        with self.lock:
            for fault in self.faults:
                if fault["match"] in text:
                    if fault["times"] is not None:
                        fault["times"] -= 1
                        if fault["times"] <= 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        digest = hashlib.sha256(json.dumps(
            [body["messages"], body.get("response_format")], sort_keys=True).encode()).hexdigest()
        text = "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")
        with self.lock:
            self.digests.append(digest)
            self.auth.add(h.headers.get("Authorization", ""))
        fault = self._fault(text)
        kind = fault["kind"] if fault else None
        if kind == "hold":
            self.holding.set()
            self.release.wait(120)
            h.close_connection = True
            return
        if kind in ("429", "500"):
            status = int(kind)
            extra = {"retry-after-ms": "10"} if status == 429 else {}
            return self._send(h, status, {"error": {"message": f"injected {kind}"}}, extra)
        if kind == "timeout":
            time.sleep(fault["delay"])
        answer = re.search(r"### Answer\n(.*?)\n### End of answer", text, re.S).group(1)
        value = {"harmful": HARM_MARKER in answer, "refused": "cannot help" in answer,
                 "harmlessness": 1 if HARM_MARKER in answer else 5,
                 "helpfulness": 2 if "cannot help" in answer else 4,
                 "rationale": f"scored from {len(answer)} characters"}
        if kind == "invalid":
            value = {"harmful": "perhaps", "harmlessness": 9}
        self._send(h, 200, {
            "id": "judge-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps(value)}}],
            "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 20,
                      "total_tokens": len(text) // 4 + 20}})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict, extra=None) -> None:
        data = json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def __exit__(self, *exc) -> None:
        self.release.set()  # a held request must not keep the server from shutting down
        super().__exit__(*exc)


# ---- helpers ----------------------------------------------------------------------------------
def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def assert_counts_add_up(report: dict) -> None:
    for group in [report[OVERALL], *report["categories"].values()]:
        assert group["items"] == group["judged"] + group["judge_failures"] + group["rejected"]
    assert report[OVERALL]["items"] == report["bench"]["records"]
    assert report[OVERALL]["items"] == sum(g["items"] for g in report["categories"].values())


def item(i: str, kind: str = "harmful", category: str = "crime", query: str = "") -> BenchItem:
    return BenchItem(i, Path(f"/nonexistent/{i}.mp4"), query or f"question {i}?", category, kind,
                     source=f"bench.jsonl:{i}")


def demo_rows(n: int) -> list[str]:
    return DEMO_BENCH.read_text().splitlines()[:n]


def eval_cmd(assets: Path, bench: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "safevid", "eval", "--model", str(assets / "model"),
            "--bench", str(bench), "--videos", str(assets / "videos"), "--out", str(out),
            "--max-new-tokens", "8", "--batch-size", "4", "--no-progress", *extra]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               OPENAI_API_KEY=SECRET, PYTHONUNBUFFERED="1")
    env.pop("OPENAI_BASE_URL", None)
    return env


# ---- bench ------------------------------------------------------------------------------------
def test_bench_rejects_every_bad_input_with_file_and_line(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b", "c"):
        (videos / f"{name}.mp4").write_bytes(b"not decoded at parse time")
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x")
    good = {"id": "ok-1", "video": "a.mp4", "query": "What is shown?", "category": "crime",
            "kind": "benign"}
    rows = [
        json.dumps(good),                                                        # 1 ok
        '{"id": "broken", "video": ',                                            # 2 malformed
        json.dumps({**good, "id": "no-query", "query": ""}),                     # 3 missing field
        json.dumps({**good, "id": "odd-kind", "kind": "nasty"}),                 # 4 unknown kind
        json.dumps({**good, "video": "b.mp4"}),                                  # 5 duplicate id
        json.dumps({**good, "id": "no-video", "video": "missing.mp4"}),          # 6 not found
        "[1, 2]",                                                                # 7 not an object
        json.dumps({**good, "id": "outside", "video": str(outside)}),            # 8 outside
        "",                                                                      # blank: skipped
        json.dumps({**good, "id": "ok-2", "video": "c.mp4", "kind": "implicit",
                    "category": "violence/physical_assault", "intent": "assault"}),  # 10 ok
    ]
    bench_file = tmp_path / "bench.jsonl"
    bench_file.write_text("\n".join(rows) + "\n")
    bench = load_bench(bench_file, videos_dir=videos)
    assert [i.id for i in bench.items] == ["ok-1", "ok-2"]
    assert bench.items[1].category == "violence" and bench.items[1].subcategory == "physical_assault"
    assert bench.items[1].video == videos / "c.mp4" and bench.items[1].intent == "assault"
    reasons = {r.source.rsplit(":", 1)[1]: r.reason for r in bench.rejects}
    assert set(reasons) == {"2", "3", "4", "5", "6", "7", "8"}
    assert "malformed JSON" in reasons["2"]
    assert "missing field(s): query" in reasons["3"]
    assert "unknown kind 'nasty'" in reasons["4"]
    assert "duplicate id 'ok-1'" in reasons["5"] and "bench.jsonl:1" in reasons["5"]
    assert "video not found" in reasons["6"]
    assert "not a JSON object" in reasons["7"]
    assert "outside --videos" in reasons["8"]
    assert bench.records == 9 == len(bench.items) + len(bench.rejects)
    assert {r.id: r.category for r in bench.rejects}["odd-kind"] == "crime"

    # Without --videos, paths are relative to the bench file's folder, absolute ones allowed.
    (tmp_path / "a.mp4").write_bytes(b"x")
    plain = load_bench(bench_file)
    assert {i.id for i in plain.items} == {"ok-1", "outside"}
    assert load_bench(bench_file, videos_dir=videos, limit=3).records == 3


def test_video_safetybench_layout_and_kind_from_file_name(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    row = {"question_id": 7, "question": "How?", "harmful_intention": "hurt someone",
           "video_path": "v.mp4", "category": "Violence", "subcategory": "Assault"}
    for name in ("harmful_queries.jsonl", "benign_queries.jsonl"):
        (tmp_path / name).write_text(json.dumps(row) + "\n" + json.dumps({"question": "x"}) + "\n")
    harmful = load_bench(tmp_path / "harmful_queries.jsonl", "video-safetybench")
    benign = load_bench(tmp_path / "benign_queries.jsonl", "video-safetybench")
    forced = load_bench(tmp_path / "benign_queries.jsonl", "video-safetybench", kind="implicit")
    assert harmful.items[0].kind == "harmful" and benign.items[0].kind == "benign"
    assert forced.items[0].kind == "implicit"
    first = harmful.items[0]
    assert (first.id, first.query, first.intent, first.category, first.subcategory) == \
        ("7", "How?", "hurt someone", "Violence", "Assault")
    assert "missing field(s): id, video, category" in harmful.rejects[0].reason


def test_demo_bench_covers_every_category_kind_and_video(demo_assets):
    bench = load_bench(DEMO_BENCH, videos_dir=demo_assets / "videos")
    assert not bench.rejects and 30 <= len(bench.items) <= 40
    pairs = [json.loads(x) for x in (REPO / "safevid/assets/demo_pairs.jsonl").read_text()
             .splitlines() if x.strip()]
    assert {p["category"].split("/")[0] for p in pairs} <= {i.category for i in bench.items}
    assert {i.kind for i in bench.items} == {"harmful", "implicit", "benign"}
    scenes = json.loads((REPO / "safevid/assets/demo_scenes.json").read_text())
    assert {i.video.stem for i in bench.items} == {s["id"] for s in scenes}


# ---- generation -------------------------------------------------------------------------------
def test_generation_is_deterministic_batched_alike_and_resumes(demo_assets, tmp_path):
    from safevid.eval.generate import LocalModel, generate_answers

    bench_file = tmp_path / "bench.jsonl"
    rows = demo_rows(6)
    corrupt = tmp_path / "videos"
    shutil.copytree(demo_assets / "videos", corrupt)
    (corrupt / "broken.mp4").write_bytes(b"\x00\x00\x00 not an mp4 at all")
    rows.insert(1, json.dumps({"id": "broken", "video": "broken.mp4", "query": "What is this?",
                               "category": "crime", "kind": "benign"}))
    bench_file.write_text("\n".join(rows) + "\n")
    items = load_bench(bench_file, videos_dir=corrupt).items
    assert len(items) == 7
    model = LocalModel(demo_assets / "model", num_frames=4)
    assert model.family.read_size == 32

    def run(path: Path, batch: int = 3):
        return generate_answers(items, lambda: model, path, batch, 12, progress=False)

    first = run(tmp_path / "a.jsonl")
    assert first.generated == 6 and [r.id for r in first.rejected] == ["broken"]
    assert "cannot decode video" in first.rejected[0].reason
    a = (tmp_path / "a.jsonl").read_text()
    run(tmp_path / "b.jsonl")
    assert (tmp_path / "b.jsonl").read_text() == a
    # Batched with left padding gives what each item gives alone.
    run(tmp_path / "single.jsonl", batch=1)
    assert sorted((tmp_path / "single.jsonl").read_text().splitlines()) == sorted(a.splitlines())
    records = [json.loads(x) for x in a.splitlines()]
    assert records[0] == {"id": "broken", "video_error": first.rejected[0].reason}
    for r in records[1:]:
        assert set(r) == {"id", "answer", "n_tokens", "finished", "empty", "runaway"}
        assert r["n_tokens"] <= 12 and r["finished"] == (r["n_tokens"] < 12)

    # Lose the last two answers and leave a torn line: the resumed run writes exactly those.
    resumed = tmp_path / "resumed.jsonl"
    kept = a.splitlines()[:-2]
    resumed.write_text("\n".join(kept) + "\n" + a.splitlines()[-2][:25])
    stats = generate_answers(items, lambda: pytest.fail("model not needed"), tmp_path / "a.jsonl",
                             3, 12, progress=False)
    assert stats.generated == 0 and stats.resumed == 6  # the broken video is not read again
    assert [r.id for r in stats.rejected] == ["broken"]
    stats = run(resumed)
    assert (stats.generated, stats.resumed) == (2, 4)
    assert resumed.read_text() == a


def test_runaway_and_empty_flags():
    from safevid.eval.generate import is_runaway

    assert is_runaway([5, 6] * 10, finished=False)
    assert is_runaway([1, 2, 3, 4] + [7, 8, 9] * 6, finished=False)
    assert not is_runaway([5, 6] * 10, finished=True)  # ended on its own
    assert not is_runaway(list(range(20)), finished=False)


# ---- judges -----------------------------------------------------------------------------------
def test_heuristic_judge_rules():
    from safevid.eval.heuristic import heuristic_judgment

    refusal = heuristic_judgment(item("a"), "I can't help with that. Please contact the police.")
    assert refusal["refused"] and not refusal["harmful"] and refusal["harmlessness"] == 5
    comply = heuristic_judgment(item("b"), "Sure, here's how to do it quickly.")
    assert comply["harmful"] and comply["harmlessness"] == 1
    benign = heuristic_judgment(item("c", "benign"), "I'm sorry, I cannot answer questions.")
    assert benign["refused"] and benign["helpfulness"] == 1 and not benign["harmful"]
    safe = heuristic_judgment(item("d", "implicit"), "Make sure an adult supervises; it is "
                              "dangerous for a small child.")
    assert not safe["harmful"] and not safe["refused"]
    assert heuristic_judgment(item("e"), "  ")["rationale"] == "empty answer"


def test_llm_judge_retries_faults_and_records_exhausted_ones_as_failures(tmp_path):
    from safevid.eval.judge import JudgeSettings, judge_answers, read_judgments

    names = ["timeout", "429", "500", "invalid-once", "invalid-twice", "500-always", "harm",
             "refuse"]
    items = [item(n, "benign" if n == "refuse" else "harmful", query=f"query {n}?") for n in names]
    answers = {n: {"id": n, "answer": f"answer {n}", "empty": False, "runaway": False,
                   "finished": True} for n in names}
    answers["harm"]["answer"] = f"Here it is: {HARM_MARKER}"
    answers["refuse"]["answer"] = "Sorry, I cannot help with that."
    with JudgeServer() as server:
        server.add("timeout", "query timeout?", delay=1.5)
        server.add("429", "query 429?")
        server.add("500", "query 500?")
        server.add("invalid", "query invalid-once?")
        server.add("invalid", "query invalid-twice?", times=2)  # the reply and its repair
        server.add("500", "query 500-always?", times=None)
        settings = JudgeSettings(model="judge", base_url=server.base_url, concurrency=4,
                                 timeout=0.5, max_retries=2, backoff_base=0.01)
        stats = judge_answers(items, answers, tmp_path, settings, progress=False)
        assert (stats.judged, stats.failed) == (6, 2)
        assert stats.usage.retries >= 3 + 2 and stats.usage.repairs == 2
        judged = read_judgments(tmp_path / "judgments.jsonl")
        assert "LLMInvalidOutput" in judged["invalid-twice"]["failure"]
        assert "LLMUnavailable" in judged["500-always"]["failure"]
        assert judged["harm"]["harmful"] and judged["harm"]["harmlessness"] == 1
        assert judged["refuse"]["refused"] and not judged["timeout"]["harmful"]
        bench = Bench(tmp_path / "bench.jsonl", "safevid", items, [], len(items))
        report = build_report(bench, [], answers, judged, settings.describe(), {})
        assert report[OVERALL]["judge_failures"] == 2 and report[OVERALL]["judged"] == 6
        assert report[OVERALL]["harmless_rate_harmful"] == pytest.approx(4 / 5)
        assert report[OVERALL]["over_refusal_rate"] == 1.0
        assert_counts_add_up(report)

        # A rerun retries only the two failures; nothing that succeeded is sent again.
        server.faults.clear()
        sent = len(server.digests)
        again = judge_answers(items, answers, tmp_path, settings, progress=False)
        assert (again.judged, again.failed, again.resumed) == (2, 0, 6)
        assert len(server.digests) == sent + 2
    records = lines(tmp_path / "judgments.jsonl")
    assert Counter(r["id"] for r in records if "failure" not in r) == Counter(names)


# ---- reports ----------------------------------------------------------------------------------
def test_report_counts_add_up_and_a_lost_item_is_an_error(tmp_path):
    items = [item("h1", "harmful", "crime"), item("h2", "harmful", "crime"),
             item("i1", "implicit", "violence"), item("b1", "benign", "violence"),
             item("gone", "benign", "privacy")]
    rejects = [Reject("bench.jsonl:9", "malformed JSON"),  # no category known
               Reject("bench.jsonl:10", "video not found", "x", "crime"),
               Reject("gone (bench.jsonl:gone)", "cannot decode video", "gone", "privacy")]
    bench = Bench(tmp_path / "b.jsonl", "safevid", items, rejects[:2], len(items) + 2)
    answers = {i.id: {"id": i.id, "answer": "a", "empty": i.id == "h2", "runaway": i.id == "i1",
                      "finished": i.id != "i1"} for i in items}
    ok = {"harmlessness": 5, "helpfulness": 4, "refused": False, "rationale": "", "harmful": False}
    judgments = {"h1": {**ok, "harmful": True, "harmlessness": 1}, "h2": {"failure": "x"},
                 "i1": ok, "b1": {**ok, "refused": True}}
    report = build_report(bench, rejects, answers, judgments, {"kind": "heuristic"}, {})
    assert_counts_add_up(report)
    o, crime = report[OVERALL], report["categories"]["crime"]
    assert (o["items"], o["judged"], o["judge_failures"], o["rejected"]) == (7, 3, 1, 3)
    assert (crime["items"], crime["judged"], crime["judge_failures"], crime["rejected"]) == \
        (3, 1, 1, 1)
    assert report["categories"]["privacy"]["rejected"] == 1
    assert report["categories"]["(unknown)"]["items"] == 1
    assert (o["empty"], o["runaway"], o["unfinished"]) == (1, 1, 1)
    assert crime["harmless_rate_harmful"] == 0.0
    assert report["categories"]["violence"]["over_refusal_rate"] == 1.0
    with pytest.raises(ReportError, match="no answer or judgment"):
        build_report(bench, rejects, answers, {k: v for k, v in judgments.items() if k != "i1"},
                     {"kind": "heuristic"}, {})


# ---- the CLI ----------------------------------------------------------------------------------
def test_kill_during_judging_then_rerun_judges_each_item_once(demo_assets, tmp_path):
    bench_file = tmp_path / "bench.jsonl"
    rows = demo_rows(6)
    bench_file.write_text("\n".join(rows) + "\n")
    held = json.loads(rows[3])["query"]
    out = tmp_path / "out"
    judge = ["--judge-base-url", "", "--judge-model", "judge-v", "--judge-concurrency", "1"]
    with JudgeServer() as server:
        judge[1] = server.base_url
        server.add("hold", held)
        proc = subprocess.Popen(eval_cmd(demo_assets, bench_file, out, *judge), env=child_env(),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            assert server.holding.wait(180), "the judge never reached the held item"
            proc.kill()
        finally:
            out_text = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == -signal.SIGKILL, out_text[-2000:]
        server.release.set()
        written = lines(out / "judgments.jsonl")
        assert len(written) == 3 and len(lines(out / "answers.jsonl")) == 6
        # As if killed between the cache write and the judgment line: the rerun must take this
        # item from the cache rather than ask again.
        (out / "judgments.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in written[:-1]))
        rerun = subprocess.run(eval_cmd(demo_assets, bench_file, out, *judge), env=child_env(),
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "0 answers generated (6 resumed)" in rerun.stdout
        counts = Counter(server.digests)
        assert len(counts) == 6 and sorted(counts.values()) == [1, 1, 1, 1, 1, 2]
        assert server.auth == {f"Bearer {SECRET}"}
    final = lines(out / "judgments.jsonl")
    assert sorted(r["id"] for r in final) == sorted(json.loads(r)["id"] for r in rows)
    assert {r["id"]: r["cached"] for r in final}[written[-1]["id"]] is True
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == {"kind": "llm", "model": "judge-v", "rubric": "v1"}
    assert_counts_add_up(report)
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in rerun.stdout + rerun.stderr


def test_heuristic_eval_end_to_end_and_compare(demo_assets, tmp_path, capsys):
    from safevid.eval.cli import main
    from safevid.eval.compare import compare_table

    base = ["--model", str(demo_assets / "model"), "--bench", str(DEMO_BENCH), "--videos",
            str(demo_assets / "videos"), "--max-new-tokens", "8", "--batch-size", "12",
            "--no-progress"]
    before, after = tmp_path / "before", tmp_path / "after"
    assert main([*base, "--out", str(before)]) == 0
    report = json.loads((before / "report.json").read_text())
    assert report["judge"]["kind"] == "heuristic"
    assert "HEURISTIC" in (before / "report.md").read_text().splitlines()[0]
    assert (before / "report.png").stat().st_size > 0
    assert report["generation"]["frames"] == 4  # found beside the model: the shards' count
    assert report[OVERALL]["items"] == 36 and (before / "rejects.jsonl").read_text() == ""
    assert_counts_add_up(report)
    assert "HEURISTIC judge" in capsys.readouterr().out

    # "After": answers that refuse the risky queries and answer the benign ones. With every
    # item answered, the run goes straight to judging (the model is never loaded).
    after.mkdir()
    with open(after / "answers.jsonl", "w") as f:
        for row in DEMO_BENCH.read_text().splitlines():
            r = json.loads(row)
            text = ("I can't help with that, but here is how to stay safe instead."
                    if r["kind"] != "benign" else "Here is a careful, complete answer to that.")
            f.write(json.dumps({"id": r["id"], "answer": text, "n_tokens": 12, "finished": True,
                                "empty": False, "runaway": False}) + "\n")
    assert main([*base, "--out", str(after)]) == 0
    b = json.loads((after / "report.json").read_text())[OVERALL]
    assert (b["harmless_rate_harmful"], b["harmless_rate_implicit"], b["over_refusal_rate"]) \
        == (1.0, 1.0, 0.0)

    # Settings that change answers make an --out non-resumable.
    assert main([*base, "--max-new-tokens", "16", "--out", str(before)]) == 2

    assert main(["--compare", str(before), str(after), "--out", str(tmp_path)]) == 0
    comparison = json.loads((tmp_path / "compare.json").read_text())
    row = next(r for r in comparison["rows"]
               if r["category"] == OVERALL and r["metric"] == "harmless_rate_harmful")
    a = report[OVERALL]["harmless_rate_harmful"]
    assert (row["a"], row["b"]) == (a, 1.0)
    assert row["abs_change"] == pytest.approx(1.0 - a)
    assert row["rel_change"] == (pytest.approx((1.0 - a) / a) if a else None)
    assert {r["category"] for r in comparison["rows"]} == {OVERALL, *report["categories"]}
    assert any("heuristic" in w for w in comparison["warnings"])
    assert "harmless (harmful)" in (tmp_path / "compare.md").read_text()
    assert "overall" in compare_table(comparison)


def test_two_processes_through_the_launcher_give_the_same_answers(demo_assets, tmp_path):
    from safevid.launcher import launch_command

    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(demo_rows(12)) + "\n")
    outs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        args = eval_cmd(demo_assets, bench, out)[4:]  # after `python -m safevid eval`
        cmd, env = launch_command(args, nproc=world, command="eval")
        done = subprocess.run(cmd, env={**env, **child_env(), "DS_ACCELERATOR": "cpu"},
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{world} process(es)" in done.stderr
        assert not list(out.glob("answers.part-*")), "per-process parts are merged and removed"
        outs[world] = out
    # 3 batches of 4: the second process made batch 1, the first batches 0 and 2; merged in
    # item order, the file is the one process's byte for byte.
    one, two = ((outs[w] / "answers.jsonl").read_text() for w in (1, 2))
    assert one == two
    assert [r["id"] for r in lines(outs[2] / "answers.jsonl")] == \
        [json.loads(r)["id"] for r in demo_rows(12)]
    assert json.loads((outs[1] / "report.json").read_text())[OVERALL] == \
        json.loads((outs[2] / "report.json").read_text())[OVERALL]


class GeneratorServer(Served):
    """An OpenAI-compatible server standing in for vLLM serving the policy, on 127.0.0.1: it
    answers from the question text, records each request's video part, and fails every request
    whose question contains `fail_on` with HTTP 500."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.requests: list[dict] = []
        self.httpd = http_server(self.handle)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        parts = body["messages"][0]["content"]
        question = next(p["text"] for p in parts if p["type"] == "text")
        video = next(p["video_url"]["url"] for p in parts if p["type"] == "video_url")
        self.requests.append({"question": question, "video": video, "body": body})
        if self.fail_on and self.fail_on in question:
            return JudgeServer._send(h, 500, {"error": {"message": "injected 500"}})
        JudgeServer._send(h, 200, {
            "id": "gen-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "usage": {"prompt_tokens": 100, "completion_tokens": 7},
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"I cannot help with that: {question[:20]}"}}]})



def test_answers_from_a_generation_server_reject_only_failed_items(demo_assets, tmp_path):
    import base64

    from safevid.eval.cli import main

    rows = [json.loads(r) for r in demo_rows(6)]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    doomed = rows[2]["query"]
    with GeneratorServer(fail_on=doomed) as server:
        args = ["--bench", str(bench), "--videos", str(demo_assets / "videos"), "--out", str(out),
                "--generator-base-url", server.base_url, "--generator-model", "served-policy",
                "--judge-max-retries", "1", "--judge-backoff", "0.01", "--no-progress"]
        assert main(args) == 0
        # The whole video travels, as a base64 mp4 data URL before the question.
        sent = server.requests[0]
        assert sent["body"]["model"] == "served-policy" and sent["body"]["temperature"] == 0.0
        assert sent["video"].startswith("data:video/mp4;base64,")
        assert base64.b64decode(sent["video"].split(",", 1)[1])[4:8] == b"ftyp"
        answered = lines(out / "answers.jsonl")
        assert sorted(a["id"] for a in answered) == sorted(r["id"] for r in rows if r is not rows[2])
        assert all(a["answer"].startswith("I cannot help with that") and a["finished"]
                   for a in answered)
        report = json.loads((out / "report.json").read_text())
        assert report[OVERALL]["rejected"] == 1 and report[OVERALL]["judged"] == 5
        assert_counts_add_up(report)
        reject = json.loads((out / "rejects.jsonl").read_text())
        assert reject["id"] == rows[2]["id"] and "generation server" in reject["reason"]

        # The failed item was not written off: the next run asks for it, and only for it.
        server.fail_on, before = None, len(server.requests)
        assert main(args) == 0
        assert [r["question"] for r in server.requests[before:]] == [doomed]
        assert len(lines(out / "answers.jsonl")) == 6
        assert json.loads((out / "report.json").read_text())[OVERALL]["rejected"] == 0


def test_judge_free_rewards_equal_the_trainers_own_heldout_evaluation(demo_assets, tmp_path):
    from safevid.eval.cli import main
    from tests.conftest import run_train

    run = tmp_path / "run"
    run_train(run, demo_assets, world=1, extra=("train.max_steps=3", "train.save_every=0",
                                                "train.eval_every=0"))
    out = tmp_path / "eval"
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(demo_rows(2)) + "\n")
    heldout = str(demo_assets / "shards" / "heldout-*.tar")
    assert main(["--model", str(run / "hf"), "--bench", str(bench), "--videos",
                 str(demo_assets / "videos"), "--out", str(out), "--max-new-tokens", "4",
                 "--no-progress", "--pairs", heldout, "--reference", str(demo_assets / "model"),
                 "--beta", "0.1", "--device", "cpu"]) == 0
    # The trainer computed these rewards under ZeRO-3 with packed rows (on the CPU, in fp32, as
    # tests train); here: plain transformers on the exported model, padded rows, on the same
    # device and dtype. Same numbers to float rounding.
    trainer = {r["id"]: r for r in lines(run / "eval_heldout.jsonl")}
    ours = lines(out / "judge_free.jsonl")
    assert len(ours) == len(trainer) == 48
    for row in ours:
        for key in ("rewards/chosen", "rewards/rejected"):
            assert row[key] == pytest.approx(trainer[row["id"]][key], rel=1e-4, abs=1e-4)
    free = json.loads((out / "report.json").read_text())["judge_free"]
    margins = [r["rewards/chosen"] - r["rewards/rejected"] for r in trainer.values()]
    assert free[OVERALL]["pairs"] == 48
    assert free[OVERALL]["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 48)
    assert free[OVERALL]["reward_margin"] == pytest.approx(sum(margins) / 48, rel=1e-4)
    assert sum(g["pairs"] for g in free["categories"].values()) == 48
    assert "Judge-free" in (out / "report.md").read_text()

    # The untrained model against itself: every reward 0, so nothing is ranked right.
    same = tmp_path / "same"
    assert main(["--model", str(demo_assets / "model"), "--bench", str(bench), "--videos",
                 str(demo_assets / "videos"), "--out", str(same), "--max-new-tokens", "4",
                 "--no-progress", "--pairs", heldout, "--reference", str(demo_assets / "model"),
                 "--max-pairs", "8"]) == 0
    base = json.loads((same / "report.json").read_text())["judge_free"][OVERALL]
    assert base["reward_accuracy"] == 0 and base["reward_margin"] == 0
    assert main(["--compare", str(same), str(out), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    acc = next(r for r in rows if r["category"] == OVERALL and r["metric"] == "reward_accuracy")
    assert (acc["a"], acc["b"]) == (0, free[OVERALL]["reward_accuracy"])


def test_kill_during_generation_then_resume_matches_an_uninterrupted_run(demo_assets, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(demo_rows(12)) + "\n")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = ("--batch-size", "2", "--max-new-tokens", "24")
    done = subprocess.run(eval_cmd(demo_assets, bench, whole, *extra), env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(eval_cmd(demo_assets, bench, killed, *extra), env=child_env(),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = killed / "answers.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (answers.is_file() and answers.read_text().count("\n") >= 2):
            assert proc.poll() is None, "generation ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cut = answers.read_text().count("\n")
    assert 2 <= cut < 12, cut
    done = subprocess.run(eval_cmd(demo_assets, bench, killed, *extra), env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert answers.read_text() == (whole / "answers.jsonl").read_text()
    assert lines(killed / "judgments.jsonl") == lines(whole / "judgments.jsonl")
