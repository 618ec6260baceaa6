"""The one frame sampler: which frames of a video are used, decoded with decord.

Both the shard writer and caption generation call `read_frames`, so the frames a captioning
model describes are exactly the frames the trained model sees.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


class VideoError(ValueError):
    """A video that cannot be used; the message names the source and the reason."""


@dataclass
class SampledFrames:
    frames: np.ndarray  # uint8 [n, size, size, 3] (or native size when size is None)
    indices: list[int]  # frame numbers in the source video
    timestamps: list[float]  # seconds
    fps: float
    total_frames: int


def sample_indices(total_frames: int, num_frames: int) -> list[int]:
    """Centres of `num_frames` equal segments: uniform coverage, no bias to either end."""
    if total_frames <= 0:
        raise ValueError("video has no frames")
    step = total_frames / num_frames
    return [min(total_frames - 1, int(step * i + step / 2)) for i in range(num_frames)]


def resize_center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size`, then a central size x size crop (the CLIP-style preprocessing)."""
    img = Image.fromarray(frame)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def resize_shorter_side(frame: np.ndarray, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Shorter side to `size`, aspect ratio kept (for families that take any aspect, Qwen2-VL),
    then smaller still if the frame would hold more than `max_pixels` (a very wide video)."""
    img = Image.fromarray(frame)
    w, h = img.size
    scale = size / min(w, h)
    if max_pixels and w * h * scale * scale > max_pixels:
        scale = (max_pixels / (w * h)) ** 0.5
    return np.asarray(img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC))


def fps_indices(total_frames: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frames at `fps` (the centre of each 1/fps interval), at most `max_frames` of them spread
    over the whole video; uniform sampling when the source's rate is unknown."""
    if source_fps <= 0:
        return sample_indices(total_frames, max_frames)
    n = max(1, min(max_frames, int(total_frames / source_fps * fps)))
    if n == max_frames and total_frames / source_fps * fps > max_frames:
        return sample_indices(total_frames, n)  # too long for the rate: spread the maximum
    return [min(total_frames - 1, int((i + 0.5) * source_fps / fps)) for i in range(n)]


def read_frames(source: str | Path | bytes, num_frames: int, size: int | None = None,
                crop: bool = True, fps: float | None = None,
                max_pixels: int | None = None) -> SampledFrames:
    """Decode `num_frames` uniformly sampled RGB frames from a file path or encoded bytes (with
    `fps`: frames at that rate, at most `num_frames`); with `size`, shorter side to it and (with
    `crop`) a central square crop, else at most `max_pixels` per frame."""
    import decord

    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        reader = decord.VideoReader(handle, ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total == 0:
            raise VideoError(f"{name}: video has no frames")
        fps_src = float(reader.get_avg_fps() or 0.0)
        indices = (fps_indices(total, fps_src, fps, num_frames) if fps
                   else sample_indices(total, num_frames))
        frames = reader.get_batch(indices).asnumpy()
    except VideoError:
        raise
    except Exception as exc:  # decord raises bare DECORDError/RuntimeError on corrupt input
        raise VideoError(f"{name}: cannot decode video ({type(exc).__name__}: {exc})") from exc
    if size is not None:
        frames = np.stack([resize_center_crop(f, size) if crop
                           else resize_shorter_side(f, size, max_pixels) for f in frames])
    timestamps = [round(i / fps_src, 3) if fps_src > 0 else 0.0 for i in indices]
    return SampledFrames(frames, indices, timestamps, fps_src, total)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg",
                                   ".mpeg", ".flv", ".f4v", ".wmv", ".3gp", ".ogv", ".ts",
                                   ".m2ts", ".mts", ".vob", ".mxf"}


__all__ = [
    "SampledFrames",
    "VideoError",
    "decode_jpeg",
    "encode_jpeg",
    "is_video_file",
    "read_frames",
    "resize_center_crop",
    "sample_indices",
]
