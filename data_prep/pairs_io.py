"""Preference pairs for `safevid prepare`, read as a stream from several file kinds and schemas.

File kinds, chosen from the path:
- `*.jsonl`: one JSON object a line. Each line is decoded as UTF-8 on its own, so one line of
  other bytes is rejected ("not UTF-8 text") and the lines after it are still read.
- `*.json`: a top-level array of objects, or an object holding that array under "data" or
  "pairs". The array is decoded one element at a time (the standard library's `raw_decode`
  over a sliding window), so only the current element is in memory. A syntax error ends the
  file: what follows it cannot be located, so it is rejected as one input.
- `*.parquet`: read with pyarrow one record batch at a time.
- a directory written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`):
  memory-mapped by `datasets.load_from_disk` and read row by row.

Schemas (`fmt`) say how source fields become ours (`PAIR_FIELDS_ALL`); `--map src=dst` flags
(`parse_map`) rename further fields on top. Every record is validated; a bad one goes to
`Rejects` with its source (`path:LINE` for JSONL, `path#INDEX` otherwise) and a reason, and
reading goes on. Only a wrong call (an unknown file kind or schema) raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from safevid.data_prep.keys import path_problem
from safevid.data_prep.rejects import Rejects

# Our pair fields: the required ones, where the video comes from, and optional extras.
REQUIRED_FIELDS = ("id", "prompt", "chosen", "rejected")
VIDEO_FIELDS = ("video", "video_id")
OPTIONAL_FIELDS = ("category", "query_type", "provenance", "split")
# A saved DatasetDict's split names as our splits (shard file names): evaluation splits are
# held out; any other name is kept as it is.
DATASET_SPLITS = {"train": "train", "test": "heldout", "validation": "heldout",
                  "valid": "heldout", "val": "heldout", "eval": "heldout", "dev": "heldout"}
PAIR_FIELDS_ALL = REQUIRED_FIELDS[:1] + VIDEO_FIELDS + REQUIRED_FIELDS[1:] + OPTIONAL_FIELDS
TEXT_FIELDS = ("prompt", "chosen", "rejected")
# Everything but provenance (free-form metadata) must be a string when present.
STRING_FIELDS = tuple(f for f in PAIR_FIELDS_ALL if f != "provenance")

# Best guess at the public SafeVid-350K release's field names: its dataset card cannot be read
# from here, so these come from the paper's vocabulary (video, query, safe/unsafe response, risk
# category). Names that are already ours ("id", "video", "prompt", "chosen", ...) need no entry:
# a field named like one of ours is always taken when nothing mapped replaces it. A release that
# names things otherwise is read with `--map its_name=our_name`.
SAFEVID_350K_MAPPING: dict[str, str] = {
    "sample_id": "id",
    "uid": "id",
    "video_path": "video",
    "video_file": "video",
    "video_name": "video_id",
    "question": "prompt",
    "query": "prompt",
    "safe_response": "chosen",
    "unsafe_response": "rejected",
    "risk_category": "category",
}

FORMATS: dict[str, dict[str, str]] = {
    "safevid": {},
    "llava-hound": {},
    "safevid-350k": SAFEVID_350K_MAPPING,
}

_SPLIT_RE = re.compile(r"[A-Za-z0-9_-]+")
_VIDEO_TOKEN_RE = re.compile(r"<video>\s*")


def parse_map(items: list[str]) -> dict[str, str]:
    """`["src=dst", ...]` -> {src: dst}; dst must be one of our field names."""
    mapping: dict[str, str] = {}
    for item in items:
        src, sep, dst = item.partition("=")
        src, dst = src.strip(), dst.strip()
        if not sep or not src or not dst:
            raise ValueError(f"--map {item!r}: expected SOURCE_FIELD=OUR_FIELD, e.g. question=prompt")
        if dst not in PAIR_FIELDS_ALL:
            raise ValueError(f"--map {item!r}: {dst!r} is not a pair field; "
                             f"choose one of {', '.join(PAIR_FIELDS_ALL)}")
        if mapping.get(src, dst) != dst:
            raise ValueError(f"--map {item!r}: {src!r} is already mapped to {mapping[src]!r}")
        mapping[src] = dst
    return mapping


def iter_pairs(path: Path, rejects: Rejects, fmt: str = "safevid",
               mapping: dict[str, str] | None = None) -> Iterator[dict]:
    """Normalised, validated pairs from `path`, one at a time; bad records go to `rejects`.

    Each pair has id, video (a path relative to the video directory, or None), video_id (or
    None), prompt, chosen, rejected, `_source`, and category, query_type, provenance and split
    when the record has them. Field names come from `fmt`'s mapping, then `mapping` on top.

    Formats:
    - "safevid": our own field names.
    - "llava-hound": ShareGPTVideo's `sft_dpo_17k.jsonl` (id, video, prompt, chosen, rejected,
      plus scores that are dropped). Its `video` is a bare name without extension (a folder of
      frames there, e.g. "v_abc123"), so a `video` with no file extension becomes video_id and
      `prepare` looks for `<video_id>.*`; one with an extension stays a path. A "<video>"
      placeholder in the prompt is removed: each model's chat template places the video itself.
    - "safevid-350k": `SAFEVID_350K_MAPPING`, a best guess to adjust with `--map`.

    Raises ValueError for an unknown format, a bad mapping or a path that is none of the
    supported kinds; everything else is reported through `rejects`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown pairs format {fmt!r}: choose one of {', '.join(FORMATS)}")
    plan = _Plan(FORMATS[fmt], parse_map([f"{k}={v}" for k, v in (mapping or {}).items()]),
                 llava_hound=fmt == "llava-hound")
    reader = _reader_for(path)
    # A plain function returning the generator: a wrong call fails here, not at the first next().
    return _validated(reader(path, rejects), plan, rejects)


# ---- field mapping and validation ------------------------------------------------------------
class _Plan:
    """For each of our fields, the source fields to try in order: --map, the format, its own name."""

    def __init__(self, fmt_map: dict[str, str], user_map: dict[str, str], llava_hound: bool):
        renamed = set(fmt_map) | set(user_map)
        self.sources: dict[str, list[str]] = {}
        for dst in PAIR_FIELDS_ALL:
            srcs = [s for s, d in user_map.items() if d == dst]
            srcs += [s for s, d in fmt_map.items() if d == dst and s not in user_map]
            # A field renamed to something else no longer stands for itself.
            if dst not in renamed or user_map.get(dst, fmt_map.get(dst)) == dst:
                srcs.append(dst)
            self.sources[dst] = list(dict.fromkeys(srcs))
        self.llava_hound = llava_hound

    def apply(self, record: dict) -> dict:
        out: dict[str, Any] = {}
        for dst, srcs in self.sources.items():
            for src in srcs:
                if record.get(src) is not None:
                    out[dst] = record[src]
                    break
        if self.llava_hound:
            video = out.get("video")
            if isinstance(video, str) and not PurePosixPath(video).suffix and out.get("video_id") is None:
                out["video_id"] = out.pop("video")
            if isinstance(out.get("prompt"), str):
                out["prompt"] = _VIDEO_TOKEN_RE.sub("", out["prompt"]).strip()
        return out


def _check(pair: dict) -> str | None:
    """The reason `pair` (already mapped to our names) is unusable, or None."""
    missing = [f for f in REQUIRED_FIELDS if pair.get(f) is None]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    for f in ("id", "video_id"):
        # Numeric ids are common in Parquet and datasets exports; an id is only a key.
        if isinstance(pair.get(f), int) and not isinstance(pair[f], bool):
            pair[f] = str(pair[f])
    wrong = [f"{f} ({type(pair[f]).__name__})" for f in STRING_FIELDS
             if pair.get(f) is not None and not isinstance(pair[f], str)]
    if wrong:
        return f"fields are not strings: {', '.join(wrong)}"
    empty = [f for f in TEXT_FIELDS + ("id",) if not pair[f].strip()]
    if empty:
        return f"empty fields: {', '.join(empty)}"
    if pair["chosen"].strip() == pair["rejected"].strip():
        return "chosen and rejected are identical"
    for f in VIDEO_FIELDS:
        # prepare treats an empty string as no value; say so by making it None.
        if pair.get(f) is not None and not pair[f].strip():
            pair[f] = None
    if pair.get("video") is None and pair.get("video_id") is None:
        return "neither video nor video_id"
    for f in VIDEO_FIELDS:
        if pair.get(f) is not None and (why := path_problem(pair[f])):
            return f"video path outside the video directory: {pair[f]!r} {why}"
    if pair.get("split") is not None and not _SPLIT_RE.fullmatch(pair["split"]):
        # The split names shard files (`<split>-000000.tar`).
        return f"split must be letters, digits, '-' or '_' (it names shard files): {pair['split']!r}"
    return None


def _validated(records: Iterator[tuple[str, Any]], plan: _Plan, rejects: Rejects) -> Iterator[dict]:
    first_source: dict[str, str] = {}
    for source, record in records:
        if not isinstance(record, dict):
            rejects.add(source, f"not a JSON object (got {_json_type(record)})")
            continue
        pair = plan.apply(record)
        reason = _check(pair)
        pair_id = pair.get("id") if isinstance(pair.get("id"), str) else None
        if reason is None and pair_id in first_source:
            reason = f"duplicate pair id {pair_id!r} (first at {first_source[pair_id]})"
        if reason is not None:
            rejects.add(source, reason, **({"id": pair_id} if pair_id is not None else {}))
            continue
        # Only accepted pairs claim their id: a later, valid record may reuse a rejected one's.
        first_source[pair_id] = source
        out = {f: pair.get(f) for f in ("id", "video", "video_id", "prompt", "chosen", "rejected")}
        out.update({f: pair[f] for f in OPTIONAL_FIELDS if pair.get(f) is not None})
        out["_source"] = source
        yield out


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- readers: (source, record) for each record of one input ----------------------------------
def _reader_for(path: Path):
    if path.is_dir():
        return _read_dataset_dir
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if suffix not in readers:
        raise ValueError(f"pairs file {path}: unsupported kind {suffix or '(no extension)'!r}; "
                         "expected .jsonl, .json, .parquet or a directory written by "
                         "datasets' save_to_disk")
    return readers[suffix]


def _read_jsonl(path: Path, rejects: Rejects) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{path}:{number}"
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rejects.add(source, f"not UTF-8 text (byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as exc:
                rejects.add(source, f"invalid JSON: {exc}")


class _BrokenJson(ValueError):
    pass


class _JsonWindow:
    """A window over a text stream from which whole JSON values are decoded one at a time."""

    CHUNK = 1 << 16
    _WS = re.compile(r"[ \t\n\r]*")
    _NUMBER_TAIL = re.compile(r"[0-9.eE+-]*")
    _DECODER = json.JSONDecoder()

    def __init__(self, f: IO[str]):
        self.f, self.buf, self.pos, self.eof = f, "", 0, False

    def _more(self, size: int) -> bool:
        chunk = "" if self.eof else self.f.read(size)
        if not chunk:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character after whitespace, "" at the end of the file."""
        while True:
            self.pos = self._WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more(self.CHUNK):
                return ""

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise _BrokenJson(f"expected {what}, found {c!r}" if c else f"expected {what}, found end of file")
        self.pos += 1
        return c

    def value(self) -> tuple[Any, str]:
        """The next JSON value and its text."""
        self.peek()
        size = self.CHUNK
        while True:
            try:
                value, end = self._DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # Cut short by the window's end (retry with more) or wrong (give up)? An error at
                # the window's edge, or an open string, may be the former; at the end of the file
                # it never is.
                near_end = exc.pos >= len(self.buf) - 8 or exc.msg.startswith("Unterminated string")
                if not near_end or not self._more(size):
                    raise _BrokenJson(str(exc)) from None
                size *= 2  # a value n chunks long is re-parsed O(log n) times, not O(n)
                continue
            # A number cut by the window's end ("-1." of "-1.5e-3") decodes as a shorter one.
            if (isinstance(value, int | float) and not isinstance(value, bool)
                    and self._NUMBER_TAIL.match(self.buf, end).end() == len(self.buf) and self._more(size)):
                size *= 2
                continue
            text = self.buf[self.pos:end]
            self.pos = end
            return value, text

    def array(self) -> Iterator[tuple[Any, str]]:
        """Elements of an array whose "[" has been consumed."""
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]", "',' or ']'") == "]":
                return


# Invalid UTF-8 bytes, decoded with surrogateescape, become these lone surrogates.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _read_json(path: Path, rejects: Rejects) -> Iterator[tuple[str, Any]]:
    index = 0
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        window = _JsonWindow(f)
        try:
            items = _json_items(window)
            if items is None:
                rejects.add(str(path), 'not a JSON array of pairs, nor an object with one under '
                                       '"data" or "pairs"')
                return
            for value, text in items:
                source = f"{path}#{index}"
                index += 1
                if _UNDECODABLE.search(text):
                    rejects.add(source, "not UTF-8 text")
                    continue
                yield source, value
        except _BrokenJson as exc:
            rejects.add(f"{path}#{index}", f"invalid JSON ({exc}); the rest of the file cannot be read")


def _json_items(window: _JsonWindow) -> Iterator[tuple[Any, str]] | None:
    first = window.peek()
    if first == "[":
        window.pos += 1
        return window.array()
    if first != "{":
        return None
    window.pos += 1
    # Walk the object's members, skipping values until the list of pairs.
    if window.peek() == "}":
        return None
    while True:
        key, _ = window.value()
        window.expect(":", "':'")
        if key in ("data", "pairs") and window.peek() == "[":
            window.pos += 1
            return window.array()
        window.value()
        if window.expect(",}", "',' or '}'") == "}":
            return None


def _read_parquet(path: Path, rejects: Rejects) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        rejects.add(str(path), "reading Parquet needs pyarrow: pip install pyarrow")
        return
    index = 0
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}#{index}", row
                index += 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        where = str(path) if index == 0 else f"{path}#{index}"
        rejects.add(where, f"cannot read Parquet ({exc}); the rest of the file cannot be read")


def _read_dataset_dir(path: Path, rejects: Rejects) -> Iterator[tuple[str, Any]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        rejects.add(str(path), "a directory of pairs is read as a saved Hugging Face dataset, "
                               "which needs the datasets package: pip install datasets")
        return
    try:
        loaded = load_from_disk(str(path))
    except (OSError, ValueError) as exc:  # FileNotFoundError when it is not a saved dataset
        rejects.add(str(path), f"not a dataset written by datasets' save_to_disk: {exc}")
        return
    # DatasetDict.save_to_disk puts each split in its own subdirectory: name rows after it,
    # and a row without a split of its own goes to its split's shards (test and validation rows
    # are held out: they must never reach the training shards).
    parts = loaded.items() if isinstance(loaded, DatasetDict) else [(None, loaded)]
    for split, dataset in parts:
        base = path if split is None else path / split
        # Any other name as a valid split (it names shard files): `train.clean` -> train_clean.
        ours = DATASET_SPLITS.get(split, re.sub(r"[^A-Za-z0-9_-]+", "_", split or "") or None)
        for index, row in enumerate(dataset):
            if ours is not None and not row.get("split"):
                row = {**row, "split": ours}
            yield f"{base}#{index}", row
