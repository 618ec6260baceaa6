"""The embedded default: synthetic videos, the shipped demo pairs, shards and the tiny model.

Built on first use by whatever entry point needs them (`safevid demo`, `safevid train`, the
Slurm script). Several ranks may start at once: one builds under a file lock into a temporary
directory that is renamed into place, the others wait on the lock and find it complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
VERSION = "2"  # bump when the recipe changes so stale asset directories are rebuilt
NUM_FRAMES, FRAME_SIZE = 4, 32


def demo_records() -> tuple[list[dict], list[dict]]:
    scenes = json.loads((ASSETS / "demo_scenes.json").read_text())
    pairs = [json.loads(line) for line in (ASSETS / "demo_pairs.jsonl").read_text().splitlines()
             if line.strip()]
    return scenes, pairs


def demo_texts() -> list[str]:
    """The texts the demo tokenizer is trained on: scene descriptions, prompts and answers."""
    scenes, pairs = demo_records()
    texts = [s["description"] for s in scenes]
    return texts + [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]


def _build(root: Path, seed: int) -> None:
    from safevid.data_prep.prepare import prepare_shards
    from safevid.data_prep.synthetic import draw_scene, write_video
    from safevid.models.tiny import build_tiny_model

    scenes, pairs = demo_records()
    for scene in scenes:
        write_video(draw_scene(scene["id"]), root / "videos" / f"{scene['id']}.mp4")
    for i, pair in enumerate(pairs):
        pair["_source"] = f"demo_pairs.jsonl:{i + 1}"
    prepare_shards(root / "videos", pairs, root / "shards", NUM_FRAMES, FRAME_SIZE,
                   videos_per_shard=3, workers=2, progress=False)
    build_tiny_model(demo_texts(), root / "model", seed=seed)
    # The Qwen family's tiny variants (configs/demo_qwen2_vl.yaml and the tests).
    from safevid.models.tiny_qwen import build_tiny_qwen2_vl

    for version, name in (("2", "model_qwen2_vl"), ("2.5", "model_qwen2_5_vl")):
        build_tiny_qwen2_vl(demo_texts(), root / name, version=version, seed=seed)


def ensure_demo_assets(root: Path, seed: int = 0) -> Path:
    root = Path(root)
    marker = root / "COMPLETE"
    if marker.is_file() and marker.read_text().strip() == VERSION:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text().strip() == VERSION:
            return root
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _build(tmp, seed)
        (tmp / "COMPLETE").write_text(VERSION)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
    return root
