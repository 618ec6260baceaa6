"""Append-only JSONL logs: one record per finished item, durable before the next one starts.

A process killed mid-write leaves at most one torn last line; readers ignore it and writers cut
it off before appending, so a restart only redoes the item whose record was torn.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The complete records of a log; a torn last line is ignored, a bad inner line reported."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline, else the torn tail
    if torn.strip():
        print(f"safevid eval: {path}: ignoring a torn last line", file=sys.stderr)
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"safevid eval: {path}:{n}: ignoring a line that is not JSON", file=sys.stderr)
            continue
        if isinstance(record, dict) and "id" in record:
            out.append(record)
    return out


class AppendLog:
    """Appends one JSON line per record with flush + fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # cut a torn tail so the next line starts clean
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
