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
                 keep: bool = False):
        self.path, self.prefix, self.count, self._seen = path, prefix, 0, set()
        # With `keep`, the records stay in memory too (for a writer that files them later).
        self.keep, self.records = keep, []
        self._lock = threading.Lock()  # the loader and the decoding threads may share one
        if path is not None and fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def add(self, source: str, reason: str, **extra) -> None:
        with self._lock:
            # Streams replay epochs: report each bad input once.
            if (source, reason) in self._seen:
                return
            self._seen.add((source, reason))
            self.count += 1
            print(f"{self.prefix}: skipping {source}: {reason}", file=sys.stderr)
            record = {"source": source, **extra, "reason": reason}
            if self.keep:
                self.records.append(record)
            if self.path is not None:
                # One short O_APPEND write per line, made at once: a killed job keeps them all.
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")


def rank_file(path: Path, rank: int) -> Path:
    """Where rank `rank` of a job whose rejects go to `path` writes them while it runs."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def merge_rank_files(path: Path) -> int:
    """Fold every rank file of `path` into `path` (rank order), written then renamed, and
    remove the rank files; the number of records in `path` then. Only for a moment when no
    rank writes: at the end of a job after its ranks have closed their loaders, or at the start
    of one, for the files a killed job left.

    A resumed job meets again the inputs it rejected after its last checkpoint: each input is
    kept once per reason, as within one process (the first record of it stays)."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}")
    parts = sorted((int(m.group(1)), p) for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}")
                   if (m := pattern.fullmatch(p.name)))
    lines = path.read_text().splitlines() if path.exists() else []
    if not parts:
        return len(lines)
    for _, part in parts:
        lines += part.read_text().splitlines()
    kept: dict = {}
    for line in lines:
        kept.setdefault(_record_key(line), line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept.values()))
    for _, part in parts:
        part.unlink()
    return len(kept)


def _record_key(line: str):
    try:
        record = json.loads(line)
        return record["source"], record["reason"]
    except (ValueError, TypeError, KeyError):
        return line  # a line cut short by a killed writer is kept as it is
