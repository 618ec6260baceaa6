"""WebDataset shard writing: one sample per video (frames + JSON with its pairs), plus index.json.

A sample's files are `<key>.json` (metadata and pairs) and `<key>.NNN.jpg` (sampled frames), so
a video stored once serves all its pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safevid.data_prep.frames import SampledFrames, encode_jpeg

INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
PAIR_FIELDS = ("id", "prompt", "chosen", "rejected")


@dataclass
class ShardSet:
    """Writes `<prefix>-NNNNNN.tar` files of at most `videos_per_shard` samples each."""

    out_dir: Path
    prefix: str
    videos_per_shard: int = 64
    jpeg_quality: int = 90
    shards: list[dict] = field(default_factory=list)
    _writer: object = None

    def add(self, video_id: str, sampled: SampledFrames, meta: dict, pairs: list[dict]) -> None:
        import webdataset as wds

        if self._writer is None or self.shards[-1]["videos"] >= self.videos_per_shard:
            self._close_current()
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._writer = wds.TarWriter(str(self.out_dir / name))
            self.shards.append({"file": name, "videos": 0, "pairs": 0})
        doc = {
            **meta,
            "id": video_id,
            "fps": sampled.fps,
            "total_frames": sampled.total_frames,
            "frame_indices": sampled.indices,
            "timestamps": sampled.timestamps,
            "pairs": pairs,
        }
        sample = {"__key__": video_id, "json": json.dumps(doc).encode()}
        for i, frame in enumerate(sampled.frames):
            sample[f"{i:03d}.jpg"] = encode_jpeg(frame, self.jpeg_quality)
        self._writer.write(sample)
        self.shards[-1]["videos"] += 1
        self.shards[-1]["pairs"] += len(pairs)

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def write_index(out_dir: Path, frames: dict, splits: dict[str, list[dict]], rejects: int,
                inputs: int) -> dict:
    """Record frame settings and counts; `inputs == pairs + rejected` is the invariant."""
    index = {
        "format": "safevid-shards/1",
        "frames": frames,
        "splits": {
            name: {
                "shards": shards,
                "videos": sum(s["videos"] for s in shards),
                "pairs": sum(s["pairs"] for s in shards),
            }
            for name, shards in splits.items()
        },
        "totals": {
            "videos": sum(s["videos"] for v in splits.values() for s in v),
            "pairs": sum(s["pairs"] for v in splits.values() for s in v),
            "rejected": rejects,
            "inputs": inputs,
        },
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return index
