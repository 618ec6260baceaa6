"""Qwen2-VL and Qwen2.5-VL behind the family interface.

The data side reproduces transformers' Qwen2-VL video processor and `get_rope_index` without the
model or torchvision: frames are resized by Qwen's `smart_resize` rule with the same uint8
antialiased bicubic kernel that torchvision's resize runs on CPU, normalised as the processor's
fused rescale-and-normalise does, and cut into patches in the processor's layout; the 3D (mrope)
positions are computed for one sequence at a time, vectorised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safevid.models.family import Family, VideoInput
from safevid.models.preprocess import CLIP_MEAN, CLIP_STD, PREPROCESSOR_FILES

# Qwen2VLVideoProcessor's class defaults, used when the checkpoint ships no processor config.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# Qwen's processors sample videos at 2 fps when told nothing else.
DEFAULT_SAMPLED_FPS = 2.0
RESCALE = 1 / 255


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule: both sides multiples of `factor`, the pixel count within
    [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _read_processor_config(name_or_path: str) -> dict:
    """The checkpoint's video processor config, else its image processor config, else {}.

    The video file comes first because that is the one transformers' video processor loads; a
    hub id is looked up in the local cache or downloaded, as loading its processor would."""
    for name in PREPROCESSOR_FILES:
        path: Path | None = Path(name_or_path) / name
        if not path.is_file():
            path = None if Path(name_or_path).is_dir() else _hub_file(name_or_path, name)
        if path is not None:
            return json.loads(path.read_text())
    return {}


def _hub_file(repo_id: str, name: str) -> Path | None:
    from transformers.utils import cached_file

    try:
        found = cached_file(repo_id, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # an unreachable or malformed id: the class defaults apply
        return None
    return Path(found) if found else None


def _pixel_bounds(cfg: dict) -> tuple[int, int]:
    """min/max pixels as the processor resolves them: explicit keys win over `size`."""
    size = cfg.get("size") or {}
    low = cfg.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS
    high = cfg.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS
    return int(low), int(high)


def _side(value) -> int:
    """Patch sizes may be written as [h, w]; Qwen's models use square patches."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square patch size {value} is not supported")
        return int(value[0])
    return int(value)


def load_attention(attn_implementation: str | dict | None) -> tuple[str | dict | None, bool]:
    """What the model is loaded with, and whether its language model is switched to flex
    attention after loading.

    transformers 5.24 does not mark the Qwen2-VL models as flex-capable and refuses to load them
    with flex_attention, although their text attention goes through the generic attention
    interface and runs flex like any other model's; so the language model is loaded with SDPA
    and switched afterwards. The vision tower never gets flex: it attends within each video
    through its own per-chunk loop (or flash varlen), which block masks do not serve."""
    if not isinstance(attn_implementation, dict):
        if attn_implementation == "flex_attention":
            return "sdpa", True
        return attn_implementation, False
    chosen = {key: "sdpa" if value == "flex_attention" else value
              for key, value in attn_implementation.items()}
    return chosen, attn_implementation.get("text_config") == "flex_attention"


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    position_rows = 3

    def __init__(self, name_or_path: str, config):
        vision = config.vision_config
        self.video_token_id = int(config.video_token_id)
        self.patch_size = _side(vision.patch_size)
        self.temporal_patch_size = _side(vision.temporal_patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.tokens_per_second = getattr(vision, "tokens_per_second", None)
        self.max_positions = int(config.text_config.max_position_embeddings)
        cfg = _read_processor_config(name_or_path)
        self.min_pixels, self.max_pixels = _pixel_bounds(cfg)
        self.mean = tuple(float(x) for x in cfg.get("image_mean", CLIP_MEAN))
        self.std = tuple(float(x) for x in cfg.get("image_std", CLIP_STD))

    # ---- data side ---------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels,
                            self.max_pixels)

    def prepare_video(self, frames: np.ndarray, meta: dict | None = None) -> VideoInput:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
        height, width = video.shape[-2:]
        size = self.resized_size(height, width)
        if size != (height, width):
            # On uint8 input this is torchvision's CPU resize kernel, so frames match the
            # transformers processor's exactly (PIL's bicubic differs by one level at places).
            video = F.interpolate(video, size=size, mode="bicubic", align_corners=False, antialias=True)
        # The processor folds 1/255 into mean and std and normalises the 0..255 values in one step.
        mean = torch.tensor(self.mean) * (1.0 / RESCALE)
        std = torch.tensor(self.std) * (1.0 / RESCALE)
        x = (video.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        if pad := -len(x) % self.temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        pixels, grid = self._patchify(x)
        return VideoInput(pixels=pixels, tokens=int(grid.prod()) // self.merge_size**2, grid_thw=grid,
                          second_per_grid=self._second_per_grid(meta))

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[F, C, H, W] -> [t*h*w, C*T*P*P] rows ordered (t, h-block, w-block, h-in-block,
        w-in-block), each row (C, T, P, P): the order the patch embedding and the merger expect."""
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        frames, channels, height, width = x.shape
        t, h, w = frames // tp, height // p, width // p
        x = x.view(t, tp, channels, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * h * w, channels * tp * p * p), torch.tensor([t, h, w], dtype=torch.long)

    def _second_per_grid(self, meta: dict | None) -> float | None:
        return None

    def positions(self, ids: list[int], video: VideoInput) -> torch.Tensor:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        n = len(ids)
        slots = (ids_t == self.video_token_id).nonzero().flatten()
        if len(slots) == 0:
            return torch.arange(n).expand(3, n).clone()
        start, count = int(slots[0]), len(slots)
        if count != video.tokens or int(slots[-1]) != start + count - 1:
            raise ValueError(f"expected one run of {video.tokens} video placeholders, found {count} "
                             f"placeholders spanning {int(slots[-1]) - start + 1} tokens")
        t, h, w = (int(v) for v in video.grid_thw)
        h, w = h // self.merge_size, w // self.merge_size
        temporal = (torch.arange(t) * self._time_interval(video)).long()
        grid = torch.stack(torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij"))
        pos = torch.empty(3, n, dtype=torch.long)
        pos[:, :start] = torch.arange(start)
        pos[:, start:start + count] = grid.reshape(3, -1) + start
        # transformers 5.24 continues the text after a video at its start + max(h, w), whatever
        # the temporal extent; the language model is run with these positions, so they are kept.
        after = start + max(h, w)
        pos[:, start + count:] = torch.arange(after, after + n - start - count)
        return pos

    def _time_interval(self, video: VideoInput) -> float | torch.Tensor:
        return 1.0

    def save_preprocessor(self, out_dir: Path) -> None:
        cfg = {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
               "merge_size": self.merge_size, "min_pixels": self.min_pixels,
               "max_pixels": self.max_pixels, "image_mean": list(self.mean),
               "image_std": list(self.std), "do_resize": True, "do_rescale": True,
               "do_normalize": True, "rescale_factor": 1 / 255,
               "video_processor_type": "Qwen2VLVideoProcessor"}
        (Path(out_dir) / "video_preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

    def context_window(self) -> int:
        return self.max_positions

    # ---- model side ----------------------------------------------------------------------
    @classmethod
    def _model_class(cls):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype, attn_implementation,
                   trust_remote_code: bool) -> nn.Module:
        load_with, text_flex = load_attention(attn_implementation)
        model = cls._model_class().from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=load_with,
            trust_remote_code=trust_remote_code,
        )
        if text_flex:
            # The attention layers read this config at every call; the vision config is apart.
            model.model.language_model.config._attn_implementation = "flex_attention"
        model.config.use_cache = False
        model.config.text_config.use_cache = False
        return model

    def freeze(self, hf: nn.Module, vision: bool, projector: bool) -> None:
        visual = hf.model.visual
        for module, frozen in ((visual.patch_embed, vision), (visual.blocks, vision),
                               (visual.merger, projector)):
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def vision_modules(self, hf: nn.Module) -> list[nn.Module]:
        return [hf.model.visual]

    def video_features(self, hf: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor | None,
                       frames: torch.Tensor) -> list[torch.Tensor]:
        visual = hf.model.visual
        merged = visual(pixels.to(visual.dtype), grid_thw=grid_thw).pooler_output
        sizes = (grid_thw.prod(-1) // self.merge_size**2).tolist()
        return list(torch.split(merged, sizes))

    def language_model(self, hf: nn.Module) -> nn.Module:
        return hf.model.language_model

    def lm_position_ids(self, positions: torch.Tensor, text_positions: torch.Tensor) -> torch.Tensor:
        # With four rows the text model takes row 0 as each token's place in its own sequence
        # (mask building, varlen packing) and rows 1-3 as the mrope positions.
        return torch.cat([text_positions.unsqueeze(0).to(positions.dtype), positions])

    def generate_inputs(self, videos: list[VideoInput], input_ids: torch.Tensor,
                        device: torch.device, dtype: torch.dtype) -> dict:
        # The model computes mrope positions from these during generation.
        out = {"pixel_values_videos": torch.cat([v.pixels for v in videos]).to(device, dtype),
               "video_grid_thw": torch.stack([v.grid_thw for v in videos]).to(device),
               "mm_token_type_ids": (input_ids == self.video_token_id).int() * 2}
        seconds = [v.second_per_grid for v in videos]
        if seconds[0] is not None:
            out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32, device=device)
        return out


class Qwen25VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL: Qwen2-VL's data path plus temporal positions in units of real time."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _second_per_grid(self, meta: dict | None) -> float:
        """Seconds one temporal grid step spans: temporal_patch_size frames at the sampled rate.

        The rate is read from the sampled frames' timestamps (their mean spacing); without them
        it is the 2 fps that Qwen's processors sample at by default."""
        stamps = (meta or {}).get("timestamps") or []
        span = float(stamps[-1]) - float(stamps[0]) if len(stamps) > 1 else 0.0
        fps = (len(stamps) - 1) / span if span > 0 else DEFAULT_SAMPLED_FPS
        return self.temporal_patch_size / fps

    def _time_interval(self, video: VideoInput) -> torch.Tensor:
        # The processor hands second_per_grid to the model as a float32 tensor and the model
        # multiplies it in float32; the same arithmetic keeps the truncated positions equal.
        second = video.second_per_grid
        if second is None:
            second = self.temporal_patch_size / DEFAULT_SAMPLED_FPS
        return self.tokens_per_second * torch.tensor(second, dtype=torch.float32)

    @classmethod
    def _model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
