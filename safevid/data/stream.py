"""The global pair stream: shards -> videos -> pairs, in one seeded order that every rank shares.

Every rank walks the same stream and keeps its slice of each step's pairs. That is what makes a
step's loss independent of the world size, and resume exact: a position is (epoch, pairs read
in that epoch), replayed from the seed. Frames are decoded only for the pairs a rank keeps, so
walking past the others costs tar reads, not JPEG decoding.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from safevid.data_prep.frames import decode_jpeg
from safevid.data_prep.rejects import Rejects
from safevid.data_prep.shards import PAIR_FIELDS


class DataError(ValueError):
    """Input data that cannot be used at all (no shards, no pairs)."""


@dataclass
class Video:
    key: str
    meta: dict
    jpegs: list[bytes]
    error: str | None = None  # set once decoding has failed
    _frames: np.ndarray | None = field(default=None, repr=False)
    prepared: object = field(default=None, repr=False)  # the family's VideoInput, while in use
    shard: str = ""  # the shard it was read from

    def frames(self) -> np.ndarray:
        """uint8 [F, H, W, 3], decoded once while in use (see `release`).

        After a failed decode: blank frames, so that a batch keeps its shape while the pairs
        of this video are weighted 0.
        """
        if self._frames is None:
            if self.error is not None:
                return np.zeros((len(self.jpegs), 16, 16, 3), np.uint8)
            frames = []
            for i, data in enumerate(self.jpegs):
                try:
                    frames.append(decode_jpeg(data))
                except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError
                    # Name the frame, not PIL's message: it embeds an object address, and the
                    # same failure must read the same each epoch.
                    raise ValueError(f"frame {i} of {len(self.jpegs)}: {type(exc).__name__}") from exc
            self._frames = np.stack(frames)
        return self._frames

    def decode_error(self) -> str | None:
        """Decode now; return why it failed, or None."""
        if self.error is None:
            try:
                self.frames()
            except ValueError as exc:
                self.error = f"undecodable frames ({exc})"
        return self.error

    def release(self) -> None:
        """Drop decoded frames: the video's other pairs may wait long in the shuffle buffer."""
        self._frames = None
        self.prepared = None


@dataclass
class Pair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    video: Video
    category: str = ""
    query_type: str = ""
    valid: bool = True  # False when its frames or text cannot be used: weight 0 in the loss
    encoded: object = None  # its token ids (collate.EncodedPair), made once, off the train thread
    source: str = ""  # the data.mix source it came from
    index: int = -1  # its place in the sample's pairs list (with video.shard and video.key:
    # where it is, which is how precomputed reference log-probs are found)
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected)

    @property
    def name(self) -> str:
        """How rejects files name the pair: shard (when known), sample key and pair id."""
        where = f"{self.video.shard}:" if self.video.shard else ""
        return f"{where}{self.video.key}/{self.id}"


def _split_patterns(spec: str) -> list[str]:
    """Split on the commas between patterns, not those inside braces (`train-{1,2}.tar`)."""
    parts, depth, current = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth <= 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def expand_shards(spec: str, key: str = "data.shards") -> list[str]:
    """Comma-separated brace patterns and globs -> sorted existing files; none is an error."""
    import braceexpand

    urls: list[str] = []
    for part in (p.strip() for p in _split_patterns(spec)):
        try:
            patterns = list(braceexpand.braceexpand(part)) if part else []
        except braceexpand.UnbalancedBracesError as exc:
            raise DataError(f"key '{key}': {exc}") from exc
        for pattern in patterns:
            matches = [pattern]
            if any(c in pattern for c in "*?["):
                # A loose glob (`train-*`) also matches the shards' JSON sidecars (member
                # indexes, reference log-probs): no shard is a JSON file.
                matches = sorted(m for m in glob.glob(pattern) if not m.endswith(".json"))
            for m in matches:
                if not Path(m).is_file():
                    raise DataError(f"key '{key}': shard not found: {m}")
                urls.append(m)
    if not urls:
        raise DataError(f"key '{key}': no shard matches {spec!r}")
    return urls


def _identity(urls):
    return urls


def iter_videos(urls: list[str], rejects: Rejects) -> Iterator[Video]:
    import webdataset as wds

    # Node and worker splitting are deliberately identity: every rank reads the same stream.
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=_identity,
                        workersplitter=_identity, empty_check=False,
                        handler=lambda exn: _reject_handler(exn, rejects))
    for sample in ds:
        source = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            meta = json.loads(sample["json"])
            # By frame number: member names sort as text (1000.jpg before 101.jpg).
            names = sorted((k for k in sample if k.endswith(".jpg")),
                           key=lambda k: (len(k.split(".")[0]), k))
            if not names:
                raise ValueError("sample has no frames")
            pairs = meta.get("pairs")
            if not isinstance(pairs, list):
                raise ValueError("sample JSON has no 'pairs' list")
        except (KeyError, ValueError) as exc:
            rejects.add(source, f"bad sample: {exc!r}")
            continue
        yield Video(sample["__key__"], meta, [sample[n] for n in names],
                    shard=sample.get("__url__", ""))


def _reject_handler(exn: Exception, rejects: Rejects) -> bool:
    rejects.add("shard", f"unreadable: {exn!r}")
    return True  # keep going with the next sample / shard


def _pairs_of(video: Video, rejects: Rejects) -> Iterator[Pair]:
    for i, p in enumerate(video.meta["pairs"]):
        missing = [k for k in PAIR_FIELDS if not isinstance(p.get(k), str) or not p.get(k)]
        if missing:
            rejects.add(f"{video.key}/pairs[{i}]", f"missing or empty fields: {missing}")
            continue
        yield Pair(p["id"], p["prompt"], p["chosen"], p["rejected"], video,
                   p.get("category", ""), p.get("query_type", ""), index=i)


class PairStream:
    """Infinite, deterministic stream of pairs over epochs, resumable from `position`."""

    def __init__(self, urls: list[str], seed: int, shuffle_buffer: int = 512,
                 rejects: Rejects | None = None, position: tuple[int, int] = (0, 0)):
        self.urls, self.seed, self.buffer = list(urls), seed, max(1, shuffle_buffer)
        self.rejects = rejects or Rejects(None)
        self.epoch, self.offset = position
        self._it = self._generate()

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.offset

    def _epoch_pairs(self, epoch: int) -> Iterator[Pair]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.urls))
        buf: list[Pair] = []
        for video in iter_videos([self.urls[i] for i in order], self.rejects):
            for pair in _pairs_of(video, self.rejects):
                if len(buf) < self.buffer:
                    buf.append(pair)
                    continue
                j = int(rng.integers(len(buf)))
                buf[j], pair = pair, buf[j]
                yield pair
        rng.shuffle(buf)
        yield from buf

    def _generate(self) -> Iterator[Pair]:
        skip = self.offset
        while True:
            n = 0
            for n, pair in enumerate(self._epoch_pairs(self.epoch), start=1):
                if n <= skip:
                    continue
                self.offset = n
                yield pair
            if n == 0:
                raise DataError(f"no usable pairs in shards {self.urls[:3]}...")
            self.epoch, self.offset, skip = self.epoch + 1, 0, 0

    def take(self, n: int) -> list[Pair]:
        return [next(self._it) for _ in range(n)]


def read_all_pairs(urls: list[str], limit: int, rejects: Rejects | None = None) -> list[Pair]:
    """The first `limit` pairs in shard order (evaluation sets)."""
    out: list[Pair] = []
    for video in iter_videos(urls, rejects or Rejects(None)):
        for pair in _pairs_of(video, rejects or Rejects(None)):
            if len(out) >= limit:
                return out
            out.append(pair)
    return out


def read_decodable_pairs(urls: list[str], limit: int, rejects: Rejects) -> list[Pair]:
    """`read_all_pairs`, less the pairs whose frames do not decode (each rejected by name)."""
    usable = []
    for pair in read_all_pairs(urls, limit, rejects):
        error = pair.video.decode_error()
        pair.video.release()
        if error is None:
            usable.append(pair)
        else:
            rejects.add(pair.name, error)
    return usable
