"""Sample keys and video paths that are safe whatever the file names are.

WebDataset groups a tar's members into samples by the part of the name before the first dot,
so a key must hold no dot; two videos with one stem in different folders must not share a key;
and a pair must not name a video outside the video directory.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafePath(ValueError):
    """A video path that points outside the video directory."""


def sample_key(relpath: str) -> str:
    """A key of [A-Za-z0-9_-] only, readable (the file's stem) and unique (a hash of the whole
    relative path): `clip.v2.mp4` -> `clip_v2-3f1c...`, `a/x.mp4` and `b/x.mp4` differ."""
    stem = PurePosixPath(relpath).stem
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48] or "video"
    digest = hashlib.sha1(relpath.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{readable}-{digest}"


def path_problem(name: str) -> str | None:
    """Why `name` cannot be a path inside a directory ('is absolute', "contains '..'"), in POSIX
    or Windows spelling, or None. Decided on the string alone."""
    win = PureWindowsPath(name)
    if PurePosixPath(name).is_absolute() or win.is_absolute() or win.drive or win.root:
        return "is absolute"
    if ".." in win.parts:
        return "contains '..'"
    return None


def confine(videos_dir: Path, name: str) -> Path:
    """`name` (relative, '/'-separated) inside `videos_dir`; absolute paths and `..` are refused
    before the file system is touched. A symbolic link inside the directory is followed
    wherever it points: the directory's owner made it (a Hugging Face hub snapshot links every
    file into its `blobs/`), while the pairs file, which may come from anywhere, can only name
    what is inside."""
    if why := path_problem(name):
        raise UnsafePath(f"video path outside the video directory: {name!r} {why}")
    return videos_dir / Path(*PureWindowsPath(name).parts)
