"""LLaVA-NeXT-Video behind the family interface: CLIP-style frames, one placeholder token per
pooled patch of every frame, plain 1D rotary positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from safevid.models.family import Family, VideoInput
from safevid.models.preprocess import frame_spec_for


def video_tokens_per_frame(config) -> int:
    v = config.vision_config
    side = v.image_size // v.patch_size // config.spatial_pool_stride
    return side * side


class LlavaNextVideoFamily(Family):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    position_rows = 1

    def __init__(self, name_or_path: str, config) -> None:
        self.video_token_id = config.video_token_index
        self.tokens_per_frame = video_tokens_per_frame(config)
        self.spec = frame_spec_for(name_or_path if Path(name_or_path).is_dir() else None,
                                   config.vision_config.image_size)
        self.max_positions = config.text_config.max_position_embeddings
        self.read_size = self.spec.size

    def prepare_video(self, frames: np.ndarray, meta: dict | None = None) -> VideoInput:
        pixels = self.spec(frames)
        return VideoInput(pixels, pixels.shape[0] * self.tokens_per_frame)

    def positions(self, ids: list[int], video: VideoInput) -> torch.Tensor:
        return torch.arange(len(ids)).unsqueeze(0)

    def save_preprocessor(self, out_dir: Path) -> None:
        self.spec.save(out_dir)

    def context_window(self) -> int:
        return self.max_positions

    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype, attn_implementation,
                   trust_remote_code: bool) -> nn.Module:
        from transformers import LlavaNextVideoForConditionalGeneration

        model = LlavaNextVideoForConditionalGeneration.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code)
        model.config.use_cache = False
        return model

    def freeze(self, hf: nn.Module, vision: bool, projector: bool) -> None:
        inner = hf.model
        for module, frozen in ((inner.vision_tower, vision), (inner.multi_modal_projector, projector),
                               (inner.vision_resampler, projector)):
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def vision_modules(self, hf: nn.Module) -> list[nn.Module]:
        inner = hf.model
        return [inner.vision_tower, inner.vision_resampler, inner.multi_modal_projector]

    def video_features(self, hf: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor | None,
                       frames: torch.Tensor) -> list[torch.Tensor]:
        # Frames are encoded and pooled one by one, so all videos' frames go through the tower
        # as one batch of frames and are split afterwards (videos may have different counts).
        # Positional: the argument is `pixel_values` in transformers 5.17 and
        # `pixel_values_videos` in 5.24, both inside setup.py's range.
        feats = hf.model.get_video_features(pixels[None]).pooler_output
        if isinstance(feats, tuple | list):  # 5.17: one [frames, tokens, dim] tensor per video
            feats = torch.stack(feats).flatten(1, 2)
        feats = feats.reshape(-1, feats.shape[-1])
        return list(feats.split((frames * self.tokens_per_frame).tolist()))

    def language_model(self, hf: nn.Module) -> nn.Module:
        return hf.model.language_model

    def generate_inputs(self, videos: list[VideoInput], input_ids: torch.Tensor,
                        device: torch.device, dtype: torch.dtype) -> dict:
        return {"pixel_values_videos": torch.stack([v.pixels for v in videos]).to(device, dtype)}
