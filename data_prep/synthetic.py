"""Procedurally drawn test videos: a scene id always gives the same H.264 file (no downloads)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def _rng(scene_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(scene_id.encode()).digest()[:8], "little"))


def draw_scene(scene_id: str, num_frames: int = 16, size: int = 64) -> np.ndarray:
    """uint8 [num_frames, size, size, 3]: a two-tone background and a few moving shapes."""
    rng = _rng(scene_id)
    sky, ground = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    horizon = int(rng.integers(size // 3, 2 * size // 3))
    shapes = [
        dict(
            kind=rng.choice(["box", "disc"]),
            color=rng.integers(0, 256, 3),
            pos=rng.uniform(0, size, 2),
            vel=rng.uniform(-2.5, 2.5, 2),
            radius=float(rng.uniform(size / 16, size / 6)),
        )
        for _ in range(int(rng.integers(2, 5)))
    ]
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        img = np.where((yy < horizon)[..., None], sky, ground).astype(np.uint8)
        for s in shapes:
            cy, cx = (s["pos"] + t * s["vel"]) % size
            r = s["radius"]
            if s["kind"] == "disc":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r * 0.6)
            img[mask] = s["color"]
        frames[t] = img
    return frames


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Encode RGB frames as H.264 (yuv420p) mp4 with PyAV's bundled libx264."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
