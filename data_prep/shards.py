"""WebDataset shard writing: one sample per video (frames + JSON with its pairs), plus index.json.

A sample's files are `<key>.json` (metadata and pairs) and `<key>.NNN.jpg` (sampled frames), so
a video stored once serves all its pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from safevid.atomic import write_text_atomic

INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
PAIR_FIELDS = ("id", "prompt", "chosen", "rejected")


def sidecar_path(shard: Path | str) -> Path:
    """`train-000000.tar` -> `train-000000.idx.json` (not matched by a `*.tar` pattern)."""
    shard = Path(shard)
    return shard.with_name(shard.name.removesuffix(".tar") + ".idx.json")


def member_index(path: Path, pairs: dict[str, int] | None = None) -> dict:
    """Where each sample's members are in a tar: {key: {"json": [offset, size], "jpg":
    [[offset, size], ...], "pairs": n}} from the tar's headers alone (`pairs` from the caller,
    who knows the documents). This is what lets a reader fetch one sample with two seeks."""
    import tarfile

    samples: dict[str, dict] = {}
    try:
        tar = tarfile.open(path, "r:")  # uncompressed only: offsets must be the file's own
    except tarfile.ReadError as exc:
        raise tarfile.ReadError(
            f"{path}: not an uncompressed tar file ({exc}); the indexed loader reads members "
            "by their offsets in the file, so decompress the shard (gunzip), or set "
            "data.loader=stream") from exc
    with tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            # WebDataset's grouping: the key is the member's directory and its basename up to
            # the first dot (`./clip.json` and `clips.v2/a.json` as made by other tools too),
            # the extension lower case.
            head, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key, ext = (f"{head}/{stem}" if head else stem), ext.lower()
            entry = samples.setdefault(key, {"json": None, "jpg": []})
            if ext == "json":
                entry["json"] = [m.offset_data, m.size]
            elif ext.endswith("jpg"):
                # By frame number: tar members sort as text (1000 before 101).
                number = int(ext.split(".")[0]) if ext.split(".")[0].isdigit() else 0
                entry["jpg"].append([number, m.offset_data, m.size])
    for key, entry in samples.items():
        entry["jpg"] = [[off, size] for _, off, size in sorted(entry["jpg"])]
        entry["pairs"] = (pairs or {}).get(key)
    return samples



def write_shard(path: Path, samples: list[tuple[str, dict, list[bytes]]]) -> None:
    """One tar of samples (key, JSON document, JPEG frames) and its member index, written
    beside and renamed into place: a file with the shard's name is always whole. Fixed member
    times, so the same inputs and settings give the same bytes."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=0)
        for key, doc, jpegs in samples:
            sample = {"__key__": key, "json": json.dumps(doc).encode()}
            for i, data in enumerate(jpegs):
                sample[f"{i:03d}.jpg"] = data
            writer.write(sample)
        writer.close()
    index = member_index(tmp, {key: len(doc["pairs"]) for key, doc, _ in samples})
    write_text_atomic(sidecar_path(path), json.dumps(index))
    tmp.replace(path)


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
