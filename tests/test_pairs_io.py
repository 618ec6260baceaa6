"""Streaming pair reader (`safevid.data_prep.pairs_io`): file kinds, schemas, --map and validation.

Every bad record kind is rejected with its source and reason while the good records around it
are still read; Parquet and saved-dataset inputs are tested when pyarrow / datasets are installed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from safevid.data_prep.pairs_io import SAFEVID_350K_MAPPING, _JsonWindow, iter_pairs, parse_map
from safevid.data_prep.rejects import Rejects

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def pair(i: int, **over) -> dict:
    return {"id": f"p{i}", "video": f"clips/v{i}.mp4", "prompt": f"q{i}", "chosen": f"safe {i}",
            "rejected": f"unsafe {i}", **over}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read(path: Path, tmp_path: Path, **kw) -> tuple[list[dict], list[dict]]:
    rejects = Rejects(tmp_path / "rejects.jsonl", fresh=True)
    pairs = list(iter_pairs(path, rejects, **kw))
    lines = (tmp_path / "rejects.jsonl").read_text().splitlines()
    assert rejects.count == len(lines)
    return pairs, [json.loads(x) for x in lines]


# ---- validation ------------------------------------------------------------------------------
BAD = [
    ("[1, 2]", "not a JSON object (got array)"),
    ('{"id": "x", ', "invalid JSON"),
    ({"id": "b", "video": "v.mp4", "prompt": "q"}, "missing fields: chosen, rejected"),
    (pair(0, id=None), "missing fields: id"),
    (pair(0, id="b", chosen=["a"]), "fields are not strings: chosen (list)"),
    (pair(0, id="b", video=3), "fields are not strings: video (int)"),
    (pair(0, id="b", prompt="  \t"), "empty fields: prompt"),
    (pair(0, id="b", chosen=" same ", rejected="same"), "chosen and rejected are identical"),
    (pair(0, id="b", video="/data/v.mp4"), "video path outside the video directory: '/data/v.mp4'"),
    (pair(0, id="b", video="a/../../v.mp4"), "video path outside the video directory: 'a/../../v.mp4'"),
    (pair(0, id="b", video="C:\\v.mp4"), "video path outside the video directory"),
    (pair(0, id="b", video=None, video_id="../v"), "video path outside the video directory: '../v'"),
    (pair(0, id="b", video=""), "neither video nor video_id"),
    (pair(0, id="b", split="../x"), "split must be"),
]


@pytest.mark.parametrize("record,reason", BAD, ids=[r for _, r in BAD])
def test_each_bad_record_is_rejected_and_the_others_kept(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), record, pair(2)])
    pairs, rejected = read(path, tmp_path)
    assert [p["id"] for p in pairs] == ["p1", "p2"]
    assert len(rejected) == 1 and rejected[0]["source"] == f"{path}:2"
    assert rejected[0]["reason"].startswith(reason)


def test_duplicate_id_names_the_first_occurrence(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl",
                       [pair(1, prompt=""), pair(1), pair(2), pair(1, prompt="again"), pair(1)])
    pairs, rejected = read(path, tmp_path)
    # The first p1 is invalid, so the second one is the pair that holds the id.
    assert [p["_source"] for p in pairs] == [f"{path}:2", f"{path}:3"]
    assert [(r["source"], r["reason"]) for r in rejected] == [
        (f"{path}:1", "empty fields: prompt"),
        (f"{path}:4", f"duplicate pair id 'p1' (first at {path}:2)"),
        (f"{path}:5", f"duplicate pair id 'p1' (first at {path}:2)"),
    ]
    assert rejected[1]["id"] == "p1"


def test_normalised_pair(tmp_path):
    extras = {"category": "violence/weapons", "query_type": "direct", "split": "heldout",
              "provenance": {"model": "m"}, "unrelated": 1}
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(1, **extras), pair(2, video=None, video_id="v2"),
                                                  pair(3, id=3, video=None, video_id=17)])
    (first, second, numeric), rejected = read(path, tmp_path)
    assert not rejected
    # Numeric ids (common in Parquet and datasets exports) are keys: read as text.
    assert numeric["id"] == "3" and numeric["video_id"] == "17"
    assert first == {**pair(1), "video_id": None, **{k: v for k, v in extras.items() if k != "unrelated"},
                     "_source": f"{path}:1"}
    assert second["video"] is None and second["video_id"] == "v2" and "split" not in second


def test_non_utf8_line_in_the_middle_keeps_the_lines_after_it(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(pair(1)).encode() + b"\n"
                     + b'{"id": "caf\xe9"}\n' + b"\n" + json.dumps(pair(3)).encode() + b"\r\n")
    pairs, rejected = read(path, tmp_path)
    assert [p["_source"] for p in pairs] == [f"{path}:1", f"{path}:4"]
    assert rejected[0]["source"] == f"{path}:2" and rejected[0]["reason"].startswith("not UTF-8 text")


# ---- streaming -------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_pairs_come_before_the_file_is_complete(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        head, tail = json.dumps(pair(1)) + "\n", json.dumps(pair(2)) + "\n"
    else:
        head, tail = "[" + json.dumps(pair(1)) + ",", json.dumps(pair(2)) + "]"
    path.write_text(head)
    it = iter_pairs(path, Rejects(None))
    assert iter(it) is it and next(it)["id"] == "p1"
    with open(path, "a") as f:  # the rest arrives only after the first pair was handed out
        f.write(tail)
    assert [p["id"] for p in it] == ["p2"]


def test_json_window_matches_json_loads_at_any_chunk_size(tmp_path, monkeypatch):
    rng = random.Random(0)
    # Scalars first: at one character a chunk, "12345678" arrives as "1" and must not stop there.
    values = [12345678, True, None, -1.5e-3] + [
        pair(i, prompt="x" * rng.randint(0, 300), provenance={"n": [1.5, -2e3, None, True]})
        for i in range(40)] + ["a \"quoted\" \\ string \u00e9\u4e2d", [], {}, 0]
    text = json.dumps(values, indent=rng.choice([None, 1]))
    path = tmp_path / "pairs.json"
    path.write_text(text)
    for chunk in (1, 3, 7, 64, 1 << 16):
        monkeypatch.setattr(_JsonWindow, "CHUNK", chunk)
        with open(path) as f:
            got = [v for v, _ in _JsonWindow(f).array()] if f.read(1) == "[" else None
        assert got == values, chunk


# ---- JSON arrays -----------------------------------------------------------------------------
def test_json_array(tmp_path):
    path = tmp_path / "pairs.json"
    body = [json.dumps(pair(1)).encode(), b"7", b'{"id": "p9", "prompt": "caf\xe9"}',
            json.dumps(pair(2)).encode()]
    path.write_bytes(b"[\n" + b",\n".join(body) + b"\n]\n")
    pairs, rejected = read(path, tmp_path)
    assert [p["_source"] for p in pairs] == [f"{path}#0", f"{path}#3"]
    assert [(r["source"], r["reason"]) for r in rejected] == [
        (f"{path}#1", "not a JSON object (got number)"), (f"{path}#2", "not UTF-8 text")]


@pytest.mark.parametrize("key", ["data", "pairs"])
def test_json_object_with_a_list(tmp_path, key):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"version": 1, "meta": {"data": 1}, key: [pair(1), pair(2)], "tail": 0}))
    pairs, rejected = read(path, tmp_path)
    assert [p["_source"] for p in pairs] == [f"{path}#0", f"{path}#1"] and not rejected


def test_json_syntax_error_keeps_what_came_before(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text("[" + json.dumps(pair(1)) + ", {\"id\": oops}, " + json.dumps(pair(2)) + "]")
    pairs, rejected = read(path, tmp_path)
    assert [p["id"] for p in pairs] == ["p1"]
    assert len(rejected) == 1 and rejected[0]["source"] == f"{path}#1"
    assert "the rest of the file cannot be read" in rejected[0]["reason"]


@pytest.mark.parametrize("text", ['{"items": []}', '"pairs"', ""])
def test_json_without_a_list_rejects_the_input(tmp_path, text):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    pairs, rejected = read(path, tmp_path)
    assert not pairs and [r["source"] for r in rejected] == [str(path)]
    assert "not a JSON array of pairs" in rejected[0]["reason"]


# ---- other file kinds ------------------------------------------------------------------------
def test_unknown_kind_and_format_raise(tmp_path):
    (tmp_path / "pairs.csv").write_text("id\n")
    with pytest.raises(ValueError, match=r"unsupported kind '\.csv'.*\.jsonl, \.json, \.parquet"):
        iter_pairs(tmp_path / "pairs.csv", Rejects(None))
    with pytest.raises(ValueError, match="unknown pairs format 'llava'"):
        iter_pairs(tmp_path / "pairs.jsonl", Rejects(None), fmt="llava")


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed")
def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [pair(i) for i in range(2500)]
    rows[1500]["chosen"] = rows[1500]["rejected"]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    pairs, rejected = read(path, tmp_path)
    assert len(pairs) == 2499 and pairs[-1]["_source"] == f"{path}#2499"
    assert [(r["source"], r["reason"]) for r in rejected] == [
        (f"{path}#1500", "chosen and rejected are identical")]
    # Numeric ids are keys like any other.
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.Table.from_pylist([pair(0, id=7)]), ints)
    assert [p["id"] for p in read(ints, tmp_path)[0]] == ["7"]


def test_unreadable_parquet_rejects_the_input(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"not parquet at all")
    pairs, rejected = read(path, tmp_path)
    assert not pairs and [r["source"] for r in rejected] == [str(path)]
    assert rejected[0]["reason"].startswith(("cannot read Parquet", "reading Parquet needs pyarrow"))


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets is not installed")
def test_saved_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [pair(1), pair(2, prompt=""), pair(3)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    ds = tmp_path / "ds"
    pairs, rejected = read(ds, tmp_path)
    assert [p["_source"] for p in pairs] == [f"{ds}#0", f"{ds}#2"]
    assert [(r["source"], r["reason"]) for r in rejected] == [(f"{ds}#1", "empty fields: prompt")]

    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list([pair(4)]),
                 "train.other": Dataset.from_list([pair(5)])}).save_to_disk(str(tmp_path / "dd"))
    dd = tmp_path / "dd"
    pairs, rejected = read(dd, tmp_path)
    assert not rejected
    # Each split's rows go to their own shards: the test split is held out, never trained on;
    # another name becomes a valid shard name.
    assert {p["_source"]: p["split"] for p in pairs} == {
        f"{dd / 'test'}#0": "heldout", f"{dd / 'train'}#0": "train",
        f"{dd / 'train.other'}#0": "train_other"}


def test_directory_that_is_not_a_dataset_rejects_the_input(tmp_path):
    (tmp_path / "nothing").mkdir()
    pairs, rejected = read(tmp_path / "nothing", tmp_path)
    assert not pairs and [r["source"] for r in rejected] == [str(tmp_path / "nothing")]
    assert "datasets" in rejected[0]["reason"]


# ---- schemas and --map -----------------------------------------------------------------------
def test_parse_map():
    assert parse_map(["question=prompt", " clip = video_id "]) == {"question": "prompt", "clip": "video_id"}
    assert parse_map([]) == {}
    for bad, message in [("question", "expected SOURCE_FIELD=OUR_FIELD"), ("=prompt", "expected"),
                         ("question=query", "'query' is not a pair field; choose one of id, video")]:
        with pytest.raises(ValueError, match=message):
            parse_map([bad])
    with pytest.raises(ValueError, match="'a' is already mapped to 'prompt'"):
        parse_map(["a=prompt", "a=chosen"])


def test_map_renames_fields_and_a_renamed_field_no_longer_stands_for_itself(tmp_path):
    rec = {"uid": "u1", "video": "clip7", "instruction": "q", "good": "a", "bad": "b", "prompt": "old"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [rec])
    mapping = parse_map(["uid=id", "video=video_id", "instruction=prompt", "good=chosen", "bad=rejected"])
    (p,), rejected = read(path, tmp_path, mapping=mapping)
    assert not rejected
    assert (p["id"], p["video"], p["video_id"], p["prompt"], p["chosen"], p["rejected"]) == (
        "u1", None, "clip7", "q", "a", "b")
    with pytest.raises(ValueError, match="not a pair field"):
        iter_pairs(path, Rejects(None), mapping={"uid": "identifier"})


def test_llava_hound(tmp_path):
    recs = [{"id": "h1", "video": "v_abc123", "prompt": "<video>\nWhat happens?", "chosen": "A dog runs.",
             "rejected": "A cat sleeps.", "chosen_score": 5.0, "rejected_score": 2.0},
            {"id": "h2", "video": "ytb/xyz.mp4", "prompt": "Describe.", "chosen": "x", "rejected": "y"}]
    path = write_jsonl(tmp_path / "sft_dpo_17k.jsonl", recs)
    (a, b), rejected = read(path, tmp_path, fmt="llava-hound")
    assert not rejected
    assert (a["video"], a["video_id"], a["prompt"]) == (None, "v_abc123", "What happens?")
    assert "chosen_score" not in a
    assert (b["video"], b["video_id"]) == ("ytb/xyz.mp4", None)


def test_safevid_350k_mapping_and_map_on_top(tmp_path):
    rec = {"sample_id": "s1", "video_path": "videos/s1.mp4", "question": "How to?", "safe_response": "No.",
           "unsafe_response": "Sure: ...", "risk_category": "crime", "score": 3}
    path = write_jsonl(tmp_path / "pairs.jsonl", [rec, {**rec, "sample_id": "s2", "ask": "Other?"}])
    (p, q), rejected = read(path, tmp_path, fmt="safevid-350k", mapping={"ask": "prompt"})
    assert not rejected and SAFEVID_350K_MAPPING["question"] == "prompt"
    assert (p["id"], p["video"], p["prompt"], p["chosen"], p["rejected"], p["category"]) == (
        "s1", "videos/s1.mp4", "How to?", "No.", "Sure: ...", "crime")
    # --map comes first; records without the mapped field fall back to the format's names.
    assert q["prompt"] == "Other?"
