"""Rejected inputs: a message naming each one, a count, and a line in a rejects JSONL file.

Bad input is never lost silently and never stops a long job: whoever meets it reports it here
and moves on.

In a multi-process job each rank writes a file of its own (`rank_file`): appends from several
hosts to one file on a network file system (NFS) are not atomic and can lose or mix lines.
After the ranks have stopped writing, one process folds the rank files into the job's one
rejects file (`merge_rank_files`).
"""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path

from safevid.atomic import write_text_atomic


class Rejects:
    def __init__(self, path: Path | None, fresh: bool = False, prefix: str = "safevid",
                 keep: bool = False, tags: dict | None = None):
        self.path, self.prefix, self.count, self._seen = path, prefix, 0, set()
        self.tags = tags or {}  # in every record (which rank met the input, say)
        # With `keep`, the records stay in memory too (for a writer that files them later).
        self.keep, self.records = keep, []
        self._lock = threading.Lock()  # a run's loader thread and its evaluation share one
        if path is not None and fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        self._start_line = path is not None and not fresh

    def add(self, source: str, reason: str, **extra) -> None:
        with self._lock:
            # Streams replay epochs: report each bad input once.
            if (source, reason) in self._seen:
                return
            self._seen.add((source, reason))
            self.count += 1
            print(f"{self.prefix}: skipping {source}: {reason}", file=sys.stderr)
            record = {"source": source, **self.tags, **extra, "reason": reason}
            if self.keep:
                self.records.append(record)
            if self.path is not None:
                line = json.dumps(record) + "\n"
                if self._start_line:
                    # A killed writer may have left this file's last line cut short: this one
                    # starts a line of its own.
                    self._start_line = False
                    line = "\n" * _ends_mid_line(self.path) + line
                # One short O_APPEND write per line, made at once: a killed job keeps them all.
                with open(self.path, "a") as f:
                    f.write(line)


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


def rank_file(path: Path, rank: int) -> Path:
    """Where rank `rank` of a job whose rejects go to `path` writes them while it runs."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def merge_rank_files(path: Path) -> int:
    """Fold every rank file of `path` into `path` (rank order), written then renamed, and
    remove the rank files; the number of records then. Only for a moment when no rank writes:
    at the end of a job after its ranks have closed their loaders (the files a killed job left
    are folded in too).

    A resumed job meets again the inputs it rejected after its last checkpoint: each input is
    kept once per reason, as within one process (the first record of it stays). A line that
    is not a record (cut short by a killed writer) is printed and left out. A merge that
    cannot write leaves every file as it was, says so and counts what they hold: it never ends
    a job whose training is done."""
    parts = _rank_files(path)
    kept: dict[str, str] = {}
    try:
        for source in [path] * path.exists() + parts:
            for line in source.read_text().splitlines():
                if line.strip():
                    key = _record_key(line)
                    if key is None:
                        print(f"safevid: {source}: not a rejects record, left out: {line!r}",
                              file=sys.stderr)
                    else:
                        kept.setdefault(key, line)
        if parts:
            write_text_atomic(path, "".join(f"{line}\n" for line in kept.values()))
            for part in parts:
                part.unlink()
    except OSError as exc:
        print(f"safevid: could not merge the rank rejects files into {path} ({exc}); they are "
              "left as they are and the next run folds them in", file=sys.stderr)
    return len(kept)


def discard_with_rank_files(path: Path) -> None:
    """Remove `path` and its rank files: a run that starts afresh (no checkpoint to resume)
    meets its inputs again, and an earlier attempt's records are not this run's."""
    for p in [path, *_rank_files(path)]:
        p.unlink(missing_ok=True)


def _rank_files(path: Path) -> list[Path]:
    """The rank files of `path`, in rank order (rank 10 after rank 2)."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}")
    found = [(int(m.group(1)), p) for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}")
             if (m := pattern.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _record_key(line: str) -> str | None:
    """What makes a record the same input and reason; None for a line that is not a record."""
    try:
        record = json.loads(line)
        return json.dumps([record["source"], record["reason"]])
    except (ValueError, TypeError, KeyError):
        return None
