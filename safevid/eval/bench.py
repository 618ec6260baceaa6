"""Benchmark files -> items. Every bad row is rejected with its file:line and a reason.

Two layouts:

- `safevid`: one JSON object per line with `id, video, query, category, kind` and optional
  `subcategory`, `intent` (the risk the query carries) and `description` (of the video; both are
  shown to the judge). A `category` written as a path ("violence/physical_assault") is split into
  category and subcategory when `subcategory` is absent.
- `video-safetybench`: `question_id, question, harmful_intention, video_path, category,
  subcategory`. That benchmark ships harmful and benign queries in separate files, so the kind is
  per file: `kind=` when given, else `benign` when the file name contains "benign", else
  `harmful`.

Either may also be one JSON array instead of JSON lines.

Video paths: relative to the bench file's folder, or to `videos_dir` when one is given.
Absolute paths are used as they are, except that with `videos_dir` every video must lie inside
it: a bench pointed at a video folder must not read files elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("harmful", "implicit", "benign")
FORMATS = ("safevid", "video-safetybench")
UNKNOWN_CATEGORY = "(unknown)"


class BenchError(ValueError):
    """The bench file as a whole cannot be read (missing, or a JSON array that does not parse)."""


@dataclass(frozen=True)
class BenchItem:
    id: str
    video: Path
    query: str
    category: str
    kind: str
    subcategory: str = ""
    intent: str = ""
    description: str = ""
    source: str = ""  # file:line, for messages


@dataclass
class Reject:
    source: str  # file:line, or the item id for problems found later (frames)
    reason: str
    id: str | None = None
    category: str = UNKNOWN_CATEGORY

    def record(self) -> dict:
        return {"source": self.source, "id": self.id, "category": self.category,
                "reason": self.reason}


@dataclass
class Bench:
    path: Path
    format: str
    items: list[BenchItem]
    rejects: list[Reject]
    records: int  # rows read (after --limit): items + rejects
    sha256: str = ""
    meta: dict = field(default_factory=dict)


def infer_kind(path: Path) -> str:
    """Video-SafetyBench's file kind from its name: its benign queries sit in "*benign*" files."""
    return "benign" if "benign" in path.name.lower() else "harmful"


def _rows(path: Path, text: str) -> list[tuple[str, str | dict | list]]:
    """(source, parsed row or the raw line when it is not JSON)."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}: not a JSON array ({exc})") from exc
        return [(f"{path}:item {i}", row) for i, row in enumerate(rows, 1)]
    out: list[tuple[str, str | dict | list]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((f"{path}:{n}", f"malformed JSON ({exc.msg} at column {exc.colno})"))
    return out


def _normalise(row: dict, fmt: str, kind: str | None) -> dict:
    if fmt == "video-safetybench":
        return {"id": row.get("question_id"), "query": row.get("question"),
                "video": row.get("video_path"), "category": row.get("category"),
                "subcategory": row.get("subcategory") or "", "kind": kind,
                "intent": row.get("harmful_intention") or "", "description": ""}
    out = {k: row.get(k) for k in ("id", "query", "video", "category", "kind")}
    out.update(subcategory=row.get("subcategory") or "", intent=row.get("intent") or "",
               description=row.get("description") or "")
    if isinstance(out["category"], str) and "/" in out["category"] and not out["subcategory"]:
        out["category"], out["subcategory"] = out["category"].split("/", 1)
    return out


def _problem(row: dict) -> str | None:
    missing = [k for k in ("id", "query", "video", "category", "kind")
               if row[k] is None or (isinstance(row[k], str) and not row[k].strip())]
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    if not isinstance(row["id"], str | int) or isinstance(row["id"], bool):
        return f"id must be a string or an integer, not {type(row['id']).__name__}"
    for key in ("query", "video", "category", "subcategory", "intent", "description"):
        if not isinstance(row[key], str):
            return f"{key} must be a string, not {type(row[key]).__name__}"
    if row["kind"] not in KINDS:
        return f"unknown kind {row['kind']!r} (expected one of {', '.join(KINDS)})"
    return None


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def resolve_video(raw: str, bench_dir: Path, videos_dir: Path | None) -> tuple[Path | None, str]:
    """The video file, or None and why not."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (videos_dir or bench_dir) / path
    if videos_dir is not None and not _inside(path, videos_dir):
        return None, f"video {raw!r} is outside --videos {videos_dir}"
    if not path.is_file():
        return None, f"video not found: {path}"
    return path, ""


def load_bench(path: str | Path, fmt: str = "safevid", videos_dir: str | Path | None = None,
               kind: str | None = None, limit: int | None = None) -> Bench:
    """Parse a bench file. `limit` takes its first N rows (bad rows count towards N)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise BenchError(f"unknown bench format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if kind is not None and kind not in KINDS:
        raise BenchError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if not path.is_file():
        raise BenchError(f"bench file not found: {path}")
    data = path.read_bytes()
    rows = _rows(path, data.decode("utf-8", errors="replace"))
    if limit is not None:
        rows = rows[:limit]
    if fmt == "video-safetybench" and kind is None:
        kind = infer_kind(path)
    videos = Path(videos_dir) if videos_dir is not None else None
    items: list[BenchItem] = []
    rejects: list[Reject] = []
    first_seen: dict[str, str] = {}
    for source, raw in rows:
        if isinstance(raw, str):
            rejects.append(Reject(source, raw))
            continue
        if not isinstance(raw, dict):
            rejects.append(Reject(source, f"not a JSON object ({type(raw).__name__})"))
            continue
        row = _normalise(raw, fmt, kind)
        item_id = str(row["id"]) if isinstance(row["id"], str | int) else None
        category = row["category"] if isinstance(row["category"], str) and row["category"] \
            else UNKNOWN_CATEGORY
        problem = _problem(row)
        # The first row with an id owns it, even when that row is itself rejected: an id names
        # one item in every output file.
        if item_id is not None and item_id in first_seen:
            problem = problem or f"duplicate id {item_id!r} (first at {first_seen[item_id]})"
        elif item_id is not None:
            first_seen[item_id] = source
        if problem is None:
            video, problem = resolve_video(row["video"], path.parent, videos)
            problem = problem or None
        if problem is not None:
            rejects.append(Reject(source, problem, item_id, category))
            continue
        items.append(BenchItem(
            id=item_id, video=video, query=row["query"].strip(), category=category,
            kind=row["kind"], subcategory=row["subcategory"], intent=row["intent"],
            description=row["description"], source=source,
        ))
    return Bench(path, fmt, items, rejects, len(rows), hashlib.sha256(data).hexdigest(),
                 {"kind": kind} if fmt == "video-safetybench" else {})


__all__ = ["FORMATS", "KINDS", "Bench", "BenchError", "BenchItem", "Reject", "infer_kind",
           "load_bench", "resolve_video"]
