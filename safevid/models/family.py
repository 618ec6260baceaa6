"""The model-family interface: everything the trainer, evaluation and export need to know about
one family of video LMMs, behind one small class.

A family answers two kinds of questions:
- data side (run in the prefetch thread, on CPU, per video and per sequence): how frames become
  the vision tower's input and how many placeholder tokens a video takes (`prepare_video`), and
  the rotary positions of a token sequence as if it were alone (`positions`);
- model side (inside the engine's forward): loading, freezing, vision features for a batch of
  videos, the language model to run, and the form its position ids take.

Adding a family is one new module with one `Family` subclass, registered in `FAMILIES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn


@dataclass
class VideoInput:
    """One video as the vision tower takes it, on CPU (made in the prefetch thread)."""

    pixels: torch.Tensor  # family-specific: LLaVA [F, 3, S, S]; Qwen [patches, C*T*P*P]
    tokens: int  # placeholder tokens the video takes in the prompt
    grid_thw: torch.Tensor | None = None  # [3] patch grid (Qwen)
    second_per_grid: float | None = None  # seconds per temporal grid step (Qwen2.5)


class Family:
    """Base class: one subclass per family. Instances are made from the checkpoint's config
    (`from_pretrained_config`) and hold only what the data side needs, so the prefetch thread
    can use them without the model."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values it handles
    position_rows: ClassVar[int] = 1  # rows of `positions`: 1 (plain RoPE) or 3 (mrope)
    video_token_id: int
    read_size: int | None = None  # frame side to sample videos at (None: as they are)

    def __init__(self, name_or_path: str, config) -> None:
        raise NotImplementedError

    # ---- data side ---------------------------------------------------------------------
    def prepare_video(self, frames: np.ndarray, meta: dict | None = None) -> VideoInput:
        """uint8 [F, H, W, 3] frames (and the shard's video record) -> the tower's input."""
        raise NotImplementedError

    def positions(self, ids: list[int], video: VideoInput) -> torch.Tensor:
        """Rotary positions [position_rows, len(ids)] of `ids` as a sequence of its own, the
        video's placeholders included."""
        raise NotImplementedError

    def save_preprocessor(self, out_dir: Path) -> None:
        """Write the frame settings this object uses as the checkpoint's processor config (for
        an export whose source had none to copy)."""

    def context_window(self) -> int:
        """The longest sequence the model takes (its max_position_embeddings)."""
        raise NotImplementedError

    # ---- model side ----------------------------------------------------------------------
    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype, attn_implementation,
                   trust_remote_code: bool) -> nn.Module:
        raise NotImplementedError

    def freeze(self, hf: nn.Module, vision: bool, projector: bool) -> None:
        raise NotImplementedError

    def vision_modules(self, hf: nn.Module) -> list[nn.Module]:
        """The modules that turn pixels into features (frozen or trained together)."""
        raise NotImplementedError

    def video_features(self, hf: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor | None,
                       frames: torch.Tensor) -> list[torch.Tensor]:
        """Features of a batch of videos: `pixels` is the videos' `VideoInput.pixels`
        concatenated on dim 0, `grid_thw` their grids stacked [V, 3] (or None), `frames` the
        first-dimension size of each one's pixels [V]. One [tokens, hidden] tensor per video.
        The vision tower runs once for all of them."""
        raise NotImplementedError

    def language_model(self, hf: nn.Module) -> nn.Module:
        raise NotImplementedError

    def lm_position_ids(self, positions: torch.Tensor, text_positions: torch.Tensor) -> torch.Tensor:
        """What the language model takes as position_ids, from `positions` [P, R, L] and each
        token's 1D place in its own sequence [R, L] (varlen attention finds sequence starts in
        it)."""
        return positions[0]

    def generate_inputs(self, videos: list[VideoInput], input_ids: torch.Tensor,
                        device: torch.device, dtype: torch.dtype) -> dict:
        """The video arguments of the transformers model's `generate` for one video per row."""
        raise NotImplementedError


def _processor_chat_template(model_dir: Path) -> str | None:
    """Some checkpoints keep the chat template only beside the processor."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "chat_template.json").is_file():
        return json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    return None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer with its chat template and a pad token ."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _processor_chat_template(Path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def model_type_of(name_or_path: str) -> str | None:
    """config.json's `model_type` for a local directory (None for a hub id: read on load)."""
    cfg = Path(name_or_path) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("model_type")
    return None


# name -> (module:class, the config.json model_type values it handles). Imported on use, so a
# run loads only its own family's code.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llava_next_video": ("safevid.models.llava_next_video:LlavaNextVideoFamily", ("llava_next_video",)),
    "qwen2_vl": ("safevid.models.qwen2_vl:Qwen2VLFamily", ("qwen2_vl",)),
    "qwen2_5_vl": ("safevid.models.qwen2_vl:Qwen25VLFamily", ("qwen2_5_vl",)),
}
FAMILY_NAMES = ("auto", *FAMILIES)


def family_class(name: str, name_or_path: str) -> type[Family]:
    """The family named in the config, or the one the checkpoint's config.json names ('auto')."""
    import importlib

    if name == "auto":
        model_type = model_type_of(name_or_path)
        if model_type is None:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(name_or_path).model_type
        found = [n for n, (_, types) in FAMILIES.items() if model_type in types]
        if not found:
            raise ValueError(f"{name_or_path}: model_type {model_type!r} is not a supported "
                             f"family; supported: {', '.join(FAMILIES)}")
        name = found[0]
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r}: must be one of {', '.join(FAMILY_NAMES)}")
    module, _, cls = FAMILIES[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)
