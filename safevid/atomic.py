"""A file that says "done" must be true: text files are written beside and renamed into place."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """A reader sees the old file or the whole new one, never part of one. The temporary name
    carries the process id and a random part, so that processes writing the same file (on
    other nodes too) never share it, and the data reaches the disk before the rename makes it
    visible."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        # A failed write (a full disk, a path in the way) leaves nothing behind to fill it.
        tmp.unlink(missing_ok=True)
        raise
