"""The training loader: a global seeded order from the shards' indexes alone, and random access
into the tar files, so that every rank knows each step's pairs and reads only its own.

Order (`GlobalOrder`). Per source (one shard set of `data.mix`, or `data.shards`) and epoch:
its videos are permuted (seeded by seed, source and epoch), their pairs laid end to end (a
video's pairs together, in a permuted order), and that sequence is cut into equal *groups* of
consecutive pairs. Each step takes `k` pairs from every group, so the step's pairs come from
`groups` different parts of the permutation: different videos and shards. Inside a group the
pairs are shuffled within blocks of `block` pairs, so a video's pairs are spread over
neighbouring steps while its frames stay cached. An epoch is ceil(pairs / (groups x k)) steps:
its last step is filled with the first pairs of the permutation again (fewer than `groups x k`
pairs train twice in that epoch; none is left out).

Ranks. The step's pairs are listed group by group and each rank trains a contiguous share,
the same split as before: the step's pairs do not depend on the world size (the loss of a step
is the same for any world size). When `data.groups` (default: `train.pairs_per_step`) is a
multiple of the world size, a rank owns whole groups, so it reads only the videos of its own
groups, each about once per epoch.

Reading. Each shard's member index (`<shard>.idx.json`, written by `safevid prepare`; built
from the tar's headers when absent) gives every sample's JSON and JPEG offsets and its pair
count. A sample is fetched with plain seeks and reads: no tar scan, no unpickling. A member that
cannot be read or parsed makes the sample's pairs rejected (by shard and key) with weight 0,
and the step keeps their slots.

Why not webdataset's `wids`: it needs a shard list with sample counts and, for random access,
scans each tar to index its members when first opened, per process. The member offsets are
known when `safevid prepare` writes a shard, so they are written beside it once, and a reader
needs one small JSON per shard and two seeks per sample; the order also needs each sample's
pair count, which `wids` does not keep.

Resume. The order is a function of the step number, so a resumed run starts at its step
without reading anything before it. The position recorded in checkpoints is (step, 0).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safevid.data.stream import PAIR_FIELDS, DataError, Pair, Video
from safevid.data_prep.rejects import Rejects


@dataclass(frozen=True)
class SampleRef:
    shard: str
    key: str
    json: tuple[int, int] | None  # (offset, size) of the JSON member
    jpgs: tuple[tuple[int, int], ...]
    pairs: int


def _scan(url: str) -> dict:
    """A shard's member index from its own headers and JSON members (no sidecar file)."""
    from safevid.data_prep.shards import member_index

    index = member_index(Path(url))
    with open(url, "rb") as f:
        for entry in index.values():
            count = 0
            if entry["json"] is not None:
                f.seek(entry["json"][0])
                try:
                    count = len(json.loads(f.read(entry["json"][1]))["pairs"])
                except (ValueError, KeyError, TypeError):
                    count = 0  # an unreadable sample: nothing to train on
            entry["pairs"] = count
    return index


def load_index(urls: list[str], rejects: Rejects | None = None) -> list[SampleRef]:
    """Every sample of `urls` with its member offsets and pair count, in shard order; a sample
    with no pairs to train (its JSON unreadable) is rejected by shard and key."""
    from safevid.data_prep.shards import sidecar_path

    refs: list[SampleRef] = []
    for url in urls:
        side = sidecar_path(url)
        index = json.loads(side.read_text()) if side.is_file() else _scan(url)
        for key in sorted(index):
            e = index[key]
            if not e.get("pairs") and rejects is not None:
                rejects.add(f"{url}:{key}", "unreadable sample: no readable JSON with pairs")
            if e.get("pairs"):
                refs.append(SampleRef(url, key, tuple(e["json"]) if e["json"] else None,
                                      tuple(tuple(j) for j in e["jpg"]), int(e["pairs"])))
    return refs


def read_sample(ref: SampleRef, rejects: Rejects) -> Video | None:
    """A sample by two seeks into its shard; None (rejected by shard and key) if unreadable."""
    try:
        if ref.json is None:
            raise ValueError("sample has no JSON member")
        with open(ref.shard, "rb") as f:
            f.seek(ref.json[0])
            raw = f.read(ref.json[1])
            if len(raw) != ref.json[1]:
                raise ValueError("truncated JSON member")
            meta = json.loads(raw)
            jpegs = []
            for off, size in ref.jpgs:
                f.seek(off)
                data = f.read(size)
                if len(data) != size:
                    raise ValueError("truncated frame member")
                jpegs.append(data)
        if not jpegs or not isinstance(meta, dict) or not isinstance(meta.get("pairs"), list):
            raise ValueError("sample has no frames or no 'pairs' list")
        return Video(ref.key, meta, jpegs, shard=ref.shard)
    except (OSError, ValueError) as exc:
        rejects.add(f"{ref.shard}:{ref.key}", f"unreadable sample: {exc}")
        return None


def make_pair(ref: SampleRef, video: Video | None, p: int, source: str, rejects: Rejects) -> Pair:
    """Pair `p` of a sample; one that cannot be used keeps its slot as an invalid stand-in
    (every rank runs the same forwards) and weighs 0."""
    record = video.meta["pairs"][p] if video is not None and p < len(video.meta["pairs"]) else None
    fields = record if isinstance(record, dict) else {}
    missing = [k for k in PAIR_FIELDS if not isinstance(fields.get(k), str) or not fields.get(k)]
    if video is None or missing:
        if video is not None:
            rejects.add(f"{ref.key}/pairs[{p}]", f"missing or empty fields: {missing}")
        stand_in = video or Video(ref.key, {}, [b""] * max(1, len(ref.jpgs)),
                                  error="unreadable sample", shard=ref.shard)
        pair = Pair(f"{ref.key}/{p}", ".", ".", ".", stand_in, index=p)
        pair.valid = False
        return pair
    return Pair(fields["id"], fields["prompt"], fields["chosen"], fields["rejected"], video,
                fields.get("category", ""), fields.get("query_type", ""), source=source, index=p)


def shard_pairs(url: str, rejects: Rejects) -> Iterator[Pair]:
    """Every pair slot of one shard in index order, one sample in memory at a time: the
    same pairs, ids and validity decisions as training draws from it."""
    for ref in load_index([url]):
        video = read_sample(ref, rejects)
        for p in range(ref.pairs):
            yield make_pair(ref, video, p, "", rejects)


@dataclass(frozen=True)
class Source:
    name: str
    refs: list[SampleRef]
    groups: int


class GlobalOrder:
    """Which pairs each step trains: [(source, sample, pair), ...] in group order."""

    def __init__(self, sources: list[Source], pairs_per_step: int, seed: int, block: int = 64):
        self.sources, self.seed, self.block = sources, seed, block
        total_groups = sum(s.groups for s in sources)
        if pairs_per_step % total_groups:
            raise DataError(f"key 'data.groups': {total_groups} groups do not split "
                            f"{pairs_per_step} pairs per step evenly")
        self.k = pairs_per_step // total_groups
        self.steps_per_epoch = []
        for s in sources:
            n = sum(r.pairs for r in s.refs)
            self.steps_per_epoch.append(-(-n // (s.groups * self.k)))
        self._cache: dict[tuple[int, int], list[list[tuple[int, int]]]] = {}
        self._lock = threading.Lock()  # the prefetch thread and the main thread both ask

    def _groups(self, source: int, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's groups of (sample, pair) for one source (cached: a few epochs at most)."""
        key = (source, epoch)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._build(source, epoch)
                # Two epochs per source at most: the current one and the next.
                for old in [k for k in self._cache if k[0] == source and k[1] < epoch - 1]:
                    del self._cache[old]
            return self._cache[key]

    def _build(self, source: int, epoch: int) -> list[list[tuple[int, int]]]:
        s = self.sources[source]
        rng = random.Random(f"{self.seed}/{s.name}/{epoch}")
        order = list(range(len(s.refs)))
        rng.shuffle(order)
        seq: list[tuple[int, int]] = []
        for i in order:
            pairs = list(range(s.refs[i].pairs))
            rng.shuffle(pairs)
            seq.extend((i, p) for p in pairs)
        length = self.steps_per_epoch[source] * self.k
        while len(seq) < length * s.groups:  # the last step's shortfall, from the start
            seq.extend(seq[:length * s.groups - len(seq)])
        groups = [seq[g * length:(g + 1) * length] for g in range(s.groups)]
        for g, group in enumerate(groups):
            # Shuffled within blocks: a video's pairs spread over neighbouring steps.
            for b in range(0, length, self.block):
                part = group[b:b + self.block]
                random.Random(f"{self.seed}/{s.name}/{epoch}/{g}/{b}").shuffle(part)
                group[b:b + self.block] = part
        return groups

    def step(self, step: int) -> list[tuple[int, int, int]]:
        """The pairs of 0-based `step`, group after group, `k` from each."""
        out = []
        for si in range(len(self.sources)):
            epoch, j = divmod(step, self.steps_per_epoch[si])
            for group in self._groups(si, epoch):
                out.extend((si, i, p) for i, p in group[j * self.k:(j + 1) * self.k])
        return out


def group_shares(groups: int, weights: list[float]) -> list[int]:
    """`groups` split by weight (largest remainder): the shares sum to `groups` exactly, so
    the step still splits evenly; a weight too small for one group is an error."""
    total = sum(weights)
    exact = [groups * w / total for w in weights]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: shares[i] - exact[i])[:groups - sum(shares)]:
        shares[i] += 1
    if min(shares) == 0:
        raise DataError(f"data.mix: weights {weights} give a source no group of the {groups} "
                        "(data.groups, default train.pairs_per_step): raise its weight or "
                        "data.groups")
    return shares


class IndexedStream:
    """`PairStream`'s role for training: `step_pairs(rank, world)` gives this rank's share of
    the next step, reading only its own samples; `position` is (next step, 0)."""

    def __init__(self, sources: list[tuple[str, list[str], float]], seed: int, pairs_per_step: int,
                 groups: int, rejects: Rejects | None = None, position: tuple[int, int] = (0, 0),
                 block: int = 64):
        groups = groups or pairs_per_step
        self.rejects = rejects or Rejects(None)
        built = []
        for (name, urls, _), share in zip(sources, group_shares(groups, [w for *_, w in sources]),
                                          strict=True):
            refs = load_index(urls, self.rejects)
            if not refs:
                raise DataError(f"data source {name!r}: no usable samples in {urls[:3]}")
            built.append(Source(name, refs, share))
        self.order = GlobalOrder(built, pairs_per_step, seed, block)
        self.next_step = position[0]
        self._videos: dict[tuple[int, int], Video | None] = {}
        self._window: dict[tuple[int, int], int] = {}

    @property
    def position(self) -> tuple[int, int]:
        return self.next_step, 0

    def _read(self, source: int, i: int) -> Video | None:
        """The sample, from this rank's cache or two seeks into its shard."""
        key = (source, i)
        if key not in self._videos:
            self._videos[key] = read_sample(self.order.sources[source].refs[i], self.rejects)
        self._window[key] = self.next_step
        return self._videos[key]

    def _pair(self, source: int, i: int, p: int) -> Pair:
        src = self.order.sources[source]
        return make_pair(src.refs[i], self._read(source, i), p, src.name, self.rejects)

    def step_pairs(self, rank: int, world: int) -> list[Pair]:
        """This rank's contiguous share of the next step (reading only those samples)."""
        if self.order.k * sum(s.groups for s in self.order.sources) % world:
            raise DataError(f"{world} ranks cannot split the step's groups evenly")
        chosen = self.order.step(self.next_step)
        share = len(chosen) // world
        mine = [self._pair(*t) for t in chosen[rank * share:(rank + 1) * share]]
        # Cached samples not used for a while leave: the block shuffle keeps a video's pairs
        # within a few steps of each other.
        horizon = self.next_step - 2 * max(1, self.order.block // max(1, self.order.k))
        for key in [k for k, s in self._window.items() if s < horizon]:
            self._videos.pop(key, None)
            self._window.pop(key)
        self.next_step += 1
        return mine

    def step_sources(self, step: int) -> dict[str, int]:
        """Pairs per source in a step: the same every step, `k` from each of its groups."""
        return {s.name: s.groups * self.order.k for s in self.order.sources}
