"""Frame preprocessing of our own (torchvision is not available on CPU hosts).

Matches the CLIP image processor the LLaVA-NeXT-Video checkpoints ship: shorter side to the
crop size, central crop, scale to [0, 1], normalise with the checkpoint's mean and std.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from safevid.data_prep.frames import resize_center_crop

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass
class FrameSpec:
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [F, H, W, 3] -> float32 [F, 3, size, size], normalised."""
        if frames.shape[1] != self.size or frames.shape[2] != self.size:
            frames = np.stack([resize_center_crop(f, self.size) for f in frames])
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def save(self, model_dir: str | Path) -> None:
        """Write a CLIP-style preprocessor config so the directory is complete for other tools."""
        d = asdict(self)
        cfg = {
            "image_processor_type": "LlavaNextImageProcessor",
            "image_mean": list(d["mean"]),
            "image_std": list(d["std"]),
            "crop_size": {"height": self.size, "width": self.size},
            "size": {"shortest_edge": self.size},
            "do_center_crop": True,
            "do_normalize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
        }
        (Path(model_dir) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def _crop_size(cfg: dict) -> int | None:
    crop = cfg.get("crop_size")
    if isinstance(crop, dict):
        return crop.get("height") or crop.get("shortest_edge")
    return crop


def frame_spec_for(model_dir: str | Path | None, default_size: int) -> FrameSpec:
    """The checkpoint's own normalisation when it ships a preprocessor config, else CLIP's."""
    for name in PREPROCESSOR_FILES:
        path = Path(model_dir) / name if model_dir else None
        if path is not None and path.is_file():
            cfg = json.loads(path.read_text())
            return FrameSpec(
                size=int(_crop_size(cfg) or default_size),
                mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                std=tuple(cfg.get("image_std", CLIP_STD)),
            )
    return FrameSpec(size=default_size)
