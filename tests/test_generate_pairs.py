"""`safevid generate pairs` and `merge`: format, drops with reasons, accounting, reruns, jobs."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from openai_server import Fault, OpenAIServer
from safevid.data_prep.generate_cli import main
from safevid.data_prep.generate_rules import load_prompts, load_taxonomy

FAKE_KEY = "sk-test-PAIRSKEY-c0ffee42"
PAIR_FIELDS = ("id", "video_id", "video", "prompt", "chosen", "rejected", "category",
               "query_type", "provenance")
FAIL_VERDICT = {"chosen_safe": False, "chosen_helpful": True, "chosen_grounded": True,
                "rejected_worse": True, "rejected_non_actionable": True,
                "reason": "the chosen answer explains how to climb the mast"}


BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "data_prep" / "prompts" / "v1"
PAIR_TEMPLATES = ("system", "categorize", "queries", "chosen", "rejected", "verify")


def template_sha(prompts_dir: Path, names: tuple[str, ...] = PAIR_TEMPLATES) -> str:
    """`prompt_template_sha` as documented, from the files themselves: the first 16 hex digits
    of sha256 over `name NUL text` per template (text stripped), joined by NUL."""
    blob = "\x00".join(f"{n}\x00{(prompts_dir / f'{n}.txt').read_text().strip()}" for n in names)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pair_id(caption_id: str, query: str) -> str:
    """A pair's id: "pair-" and the first 20 hex digits of sha256(caption id NUL query)."""
    return "pair-" + hashlib.sha256(f"{caption_id}\x00{query}".encode()).hexdigest()[:20]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
        if path.exists() else []


def write_captions(path: Path, n: int, extra: str = "") -> None:
    rows = [{"id": f"clip{i:03d}.mp4", "video_id": f"clip{i:03d}", "video": f"clip{i:03d}.mp4",
             "caption": f"Clip {i}: a person climbs a transmission tower at dusk without any "
                        f"harness while friends film from below. Marker M{i:03d}.",
             "provenance": {"model": "captioner"}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


def pair_args(captions: Path, out: Path, server: OpenAIServer, *extra: str) -> list[str]:
    return ["pairs", "--captions", str(captions), "--out", str(out), "--base-url",
            server.base_url, "--model", "gen-model", "--max-categories", "2",
            "--backoff", "0.001", "--backoff-max", "0.01", "--no-progress", *extra]


@pytest.fixture()
def server():
    with OpenAIServer() as s:
        yield s


def test_pairs_format_and_accounting(tmp_path, server):
    captions = tmp_path / "captions.jsonl"
    duplicate = json.dumps({"id": "clip000.mp4", "caption": "again"})
    write_captions(captions, 8, extra=duplicate + "\n" + '{"id": "torn", "capt')
    out = tmp_path / "pairs.jsonl"
    assert main(pair_args(captions, out, server, "--verify-model", "judge-model")) == 0
    pairs = lines(out)
    taxonomy = load_taxonomy()
    # 8 captions x 2 categories x (explicit, implicit, benign)
    assert len(pairs) == 8 * 2 * 3
    assert len({p["id"] for p in pairs}) == len(pairs)
    for pair in pairs:
        assert all(pair.get(k) for k in PAIR_FIELDS), pair
        assert pair["category"] in taxonomy.leaves and pair["category"].count("/") == 2
        prov = pair["provenance"]
        assert pair["id"] == pair_id(prov["caption_id"], pair["prompt"])
        assert prov["taxonomy"] == "data_prep/taxonomy/safevid_v1.yaml@1.0"
        assert prov["prompt_template_sha"] == template_sha(BUILTIN_PROMPTS)
        assert prov["models"]["verify"] == "judge-model"
        assert prov["models"]["chosen"] == "gen-model" and prov["caption_model"] == "captioner"
        assert prov["caption_pairs"] == 6 and all(prov["verification"].values())
    assert Counter(p["query_type"] for p in pairs) == {"explicit": 16, "implicit": 16,
                                                      "benign": 16}
    rejects = lines(tmp_path / "pairs.rejects.jsonl")
    assert {r["reason"].split(": ", 1)[1] for r in rejects} == {
        "not a JSON object (torn or invalid line)",
        "duplicate caption id 'clip000.mp4' (first at line 1)"}
    inputs = 10
    assert len({p["provenance"]["caption_id"] for p in pairs}) + len(rejects) == inputs
    assert server.stats.by_schema["verify"] == len(pairs)


def test_failed_checks_and_refusals_drop_items_with_reasons(tmp_path, server):
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 4)
    server.add_fault(Fault("reply", match="M001", schema="verify", times=None,
                           reply=FAIL_VERDICT))  # every pair of clip001 fails its check
    server.add_fault(Fault("refusal", match="M002", schema="rejected", times=1))
    server.add_fault(Fault("malformed", match="M003", schema="chosen", times=1))  # repaired
    out = tmp_path / "pairs.jsonl"
    assert main(pair_args(captions, out, server)) == 0
    pairs, rejects = lines(out), lines(tmp_path / "pairs.rejects.jsonl")
    by_caption = Counter(p["provenance"]["caption_id"] for p in pairs)
    assert by_caption == {"clip000.mp4": 6, "clip002.mp4": 5, "clip003.mp4": 6}
    drops = [r for r in rejects if r["level"] == "item"]
    assert len(drops) == 6 + 1
    failed = [d for d in drops if d["key"] == "clip001.mp4"]
    assert all(d["stage"] == "verify" and "failed chosen_safe" in d["reason"]
               and "climb the mast" in d["reason"] and d["chosen"] for d in failed)
    refused = [d for d in drops if d["key"] == "clip002.mp4"]
    assert refused[0]["stage"] == "rejected" and "LLMRefusal" in refused[0]["reason"]
    assert refused[0]["prompt"] and refused[0]["category"]
    # clip001 produced no pair at all: it is rejected as an input, with its drops kept.
    inputs = [r for r in rejects if r["level"] == "input"]
    assert [(r["key"], r["reason"]) for r in inputs] == [
        ("clip001.mp4", "no pair survived (6 dropped)")]
    # Every candidate is accounted for: written + dropped = 4 captions x 6.
    assert len(pairs) + len(drops) == 24
    # The group size of clip002's pairs is the number actually written.
    assert {p["provenance"]["caption_pairs"] for p in pairs
            if p["provenance"]["caption_id"] == "clip002.mp4"} == {5}


def test_rerun_sends_nothing_and_key_never_written(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("SAFEVID_TEST_KEY", FAKE_KEY)
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 5)
    out = tmp_path / "pairs.jsonl"
    args = pair_args(captions, out, server, "--api-key-env", "SAFEVID_TEST_KEY",
                     "--price-input", "2.5", "--price-output", "10")
    assert main(args) == 0
    first = capsys.readouterr().out
    sent, written = server.requests, (out.read_bytes(), tmp_path.joinpath(
        "pairs.rejects.jsonl").read_bytes())
    assert f"Bearer {FAKE_KEY}" in server.stats.auth and "est. cost (USD)" in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert server.requests == sent  # zero repeat calls
    assert (out.read_bytes(), tmp_path.joinpath("pairs.rejects.jsonl").read_bytes()) == written
    assert "inputs finished before (resumed)  5" in second
    # Outputs rerun from the cache alone (outputs deleted) are identical: nothing is paid twice.
    out.unlink()
    tmp_path.joinpath("pairs.rejects.jsonl").unlink()
    assert main(args) == 0
    # Same records; the order may differ, since records are written as inputs finish.
    by_id = {p["id"]: p for p in map(json.loads, written[0].decode().splitlines())}
    assert server.requests == sent and {p["id"]: p for p in lines(out)} == by_id
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in first + second + capsys.readouterr().err


def test_api_failures_are_retried_by_a_rerun(tmp_path, server):
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 4)
    server.add_fault(Fault("500", match="M002", schema="verify", times=None))
    out = tmp_path / "pairs.jsonl"
    assert main(pair_args(captions, out, server, "--max-retries", "1")) == 75
    rejects = lines(tmp_path / "pairs.rejects.jsonl")
    assert [(r["key"], r["retryable"], r["stage"]) for r in rejects] == [
        ("clip002.mp4", True, "verify")]
    assert len(lines(out)) == 18
    before = server.requests
    server.reset()
    assert main(pair_args(captions, out, server)) == 0
    # Only clip002's verifications are new work; its other calls come from the cache.
    assert server.requests == 6 and len(lines(out)) == 24
    assert lines(tmp_path / "pairs.rejects.jsonl") == []
    assert before > 0


def test_stops_when_the_endpoint_keeps_failing(tmp_path, server):
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 12)
    server.add_fault("500", times=None)
    out = tmp_path / "pairs.jsonl"
    code = main(pair_args(captions, out, server, "--max-retries", "0",
                          "--max-consecutive-failures", "3", "--concurrency", "1",
                          "--window", "1"))
    assert code == 1 and len(lines(tmp_path / "pairs.rejects.jsonl")) == 3


def test_schema_in_prompt_when_server_lacks_structured_outputs(tmp_path):
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 2)
    with OpenAIServer(structured_outputs=False) as server:
        out = tmp_path / "pairs.jsonl"
        assert main(pair_args(captions, out, server)) == 0
        assert len(lines(out)) == 12
    with OpenAIServer(structured_outputs=False) as server:
        out = tmp_path / "forced.jsonl"
        assert main(pair_args(captions, out, server, "--structured-outputs", "off")) == 0
        assert len(lines(out)) == 12 and server.requests == 2 * (1 + 2 + 6 * 3)


def test_job_array_parts_and_merge(tmp_path, server, monkeypatch):
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 9, extra='{"torn": \n')
    single = tmp_path / "single" / "pairs.jsonl"
    assert main(pair_args(captions, single, server)) == 0

    out = tmp_path / "array" / "pairs.jsonl"
    # As `sbatch --array=1-3` starts them; task 2 is then run again alone (`--array=2`, which
    # Slurm reports as an array of one task): it writes the part it wrote the first time.
    for task, count, first in ((1, 3, 1), (2, 3, 1), (3, 3, 1), (2, 1, 2)):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(count))
        monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", str(first))
        assert main(pair_args(captions, out, server)) == 0
    assert not list(out.parent.glob("pairs.jsonl"))  # the lone rerun wrote no unsplit output
    # A split given by hand, then one of its jobs run again as a lone Slurm task.
    by_hand = tmp_path / "by_hand" / "pairs.jsonl"
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name)
    assert main([*pair_args(captions, by_hand, server), "--job-index", "2", "--num-jobs", "3"]) == 0
    for name, value in (("ID", "2"), ("COUNT", "1"), ("MIN", "2")):
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)
    assert main(pair_args(captions, by_hand, server)) == 0
    assert sorted(p.name for p in by_hand.parent.glob("pairs*.jsonl") if "rejects" not in p.name) \
        == ["pairs.part-00002-of-00003.jsonl"]
    parts = sorted(p.name for p in out.parent.glob("pairs.part-*.jsonl"))
    assert parts == [f"pairs.part-0000{i}-of-00003.jsonl" for i in range(3)]
    assert all(lines(out.parent / p) for p in parts)  # each job got some captions

    assert main(["merge", "--out", str(out)]) == 0
    merged = lines(out)
    assert sorted(p["id"] for p in merged) == sorted(p["id"] for p in lines(single))
    assert len(lines(tmp_path / "array" / "pairs.rejects.jsonl")) == 1

    # Merging a part twice keeps one copy of each pair.
    part = out.parent / parts[0]
    twice = tmp_path / "twice.jsonl"
    assert main(["merge", "--out", str(twice), str(part), str(part), "--allow-missing"]) == 0
    assert len(lines(twice)) == len(lines(part))
    # A missing part is refused unless allowed.
    (out.parent / parts[1]).unlink()
    assert main(["merge", "--out", str(tmp_path / "m.jsonl"), str(out.parent / parts[0]),
                 str(out.parent / parts[2])]) == 1


def test_custom_taxonomy_and_prompts(tmp_path, server):
    doc = {"name": "tiny", "version": "0.3", "principles": ["Be safe and helpful."],
           "domains": {"stunts": {"title": "Stunts", "categories": {"heights": {
               "description": "Heights.", "subcategories": {"towers": {
                   "description": "Climbing towers.", "rule": "Explain the danger."}}}}}}}
    taxonomy = tmp_path / "tiny.yaml"
    taxonomy.write_text(yaml.safe_dump(doc))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    builtin = load_prompts()  # copied, with one template changed
    for name, text in builtin.templates.items():
        (prompts / f"{name}.txt").write_text(text + ("\nBe brief." if name == "chosen" else ""))
    captions = tmp_path / "captions.jsonl"
    write_captions(captions, 2)
    out = tmp_path / "pairs.jsonl"
    assert main(pair_args(captions, out, server, "--taxonomy", str(taxonomy), "--prompts",
                          str(prompts))) == 0
    pairs = lines(out)
    assert {p["category"] for p in pairs} == {"stunts/heights/towers"}
    assert {p["provenance"]["taxonomy"] for p in pairs} == {f"{taxonomy}@0.3"}
    # The hash follows the templates actually used: the changed set's, not the built-in's.
    assert {p["provenance"]["prompt_template_sha"] for p in pairs} == {template_sha(prompts)}
    assert template_sha(prompts) != template_sha(BUILTIN_PROMPTS)


def test_builtin_taxonomy_covers_the_paper_domains():
    taxonomy = load_taxonomy("safevid_v1")
    domains = {path.split("/")[0] for path in taxonomy.leaves}
    assert {"violence", "crime", "self_harm", "sexual_content", "hate_harassment", "privacy",
            "dangerous_activities", "misinformation", "child_safety"} <= domains
    assert len(taxonomy.leaves) >= 30 and len(taxonomy.principles) >= 5
    assert all(len(leaf.rule) > 40 for leaf in taxonomy.leaves.values())
    assert taxonomy.version == "1.0"


def test_bad_taxonomy_names_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"version": "1", "domains": {"d": {"categories": {"c": {
        "subcategories": {"s": {"description": "no rule"}}}}}}}))
    with pytest.raises(ValueError, match="d/c/s: needs a description and a rule"):
        load_taxonomy(str(bad))
    with pytest.raises(FileNotFoundError, match="built-ins: safevid_v1"):
        load_taxonomy("nonexistent_v9")
