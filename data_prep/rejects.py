"""Rejected inputs: a message naming each one, a count, and a line in a rejects JSONL file.

Bad input is never lost silently and never stops a long job: whoever meets it reports it here
and moves on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Rejects:
    def __init__(self, path: Path | None, fresh: bool = False, prefix: str = "safevid",
                 keep: bool = False):
        self.path, self.prefix, self.count, self._seen = path, prefix, 0, set()
        # With `keep`, the records stay in memory too (for a writer that files them later).
        self.keep, self.records = keep, []
        if path is not None and fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def add(self, source: str, reason: str, **extra) -> None:
        # Streams replay epochs: report each bad input once.
        if (source, reason) in self._seen:
            return
        self._seen.add((source, reason))
        self.count += 1
        print(f"{self.prefix}: skipping {source}: {reason}", file=sys.stderr)
        if self.keep:
            self.records.append({"source": source, **extra, "reason": reason})
        if self.path is not None:
            # One short O_APPEND write per line: several ranks may share the file.
            with open(self.path, "a") as f:
                f.write(json.dumps({"source": source, **extra, "reason": reason}) + "\n")
