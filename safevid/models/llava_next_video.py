"""LLaVA-NeXT-Video through transformers: loading, freezing, and per-sequence answer log-probs.

The forward is our own composition of the model's parts rather than `model(...)`: a video is
encoded once per pair and its features go into both the chosen and the rejected sequence, and
the LM head is applied only to answer positions (fused, it never builds [tokens x vocab]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safevid.data.collate import IGNORE, MicroBatch, VideoTokens
from safevid.models.preprocess import FrameSpec, frame_spec_for


class LogProbHead(nn.Module):
    """Answer-token log-probs from hidden states with the model's LM head.

    It owns no parameters. Under ZeRO-3 the LM-head weight is registered as an external
    parameter of this module, so DeepSpeed gathers it for this call (forward and backward) only.
    """

    def __init__(self, lm_head: nn.Linear, fused: bool):
        super().__init__()
        object.__setattr__(self, "_lm_head", lm_head)  # not a child: keeps state_dict unchanged
        self.fused = fused

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from safevid.kernels import fused_logprobs, naive_logprobs

        fn = fused_logprobs if self.fused else naive_logprobs
        return fn(hidden, self._lm_head.weight, labels, ignore_index=IGNORE)


@dataclass
class LoadedModel:
    model: DPOModel
    tokenizer: object
    frames: FrameSpec
    video: VideoTokens


def video_tokens_per_frame(config) -> int:
    v = config.vision_config
    side = v.image_size // v.patch_size // config.spatial_pool_stride
    return side * side


def _processor_chat_template(model_dir: Path) -> str | None:
    """Some checkpoints keep the chat template only beside the processor."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    if (model_dir / "chat_template.json").is_file():
        return json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    return None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer with its chat template and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _processor_chat_template(Path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load(name_or_path: str, num_frames: int, dtype: torch.dtype, fused: bool,
         attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> LoadedModel:
    from transformers import LlavaNextVideoForConditionalGeneration

    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    model.config.use_cache = False
    cfg = model.config
    video = VideoTokens(cfg.video_token_index, num_frames * video_tokens_per_frame(cfg))
    frames = frame_spec_for(name_or_path if Path(name_or_path).is_dir() else None,
                            cfg.vision_config.image_size)
    return LoadedModel(DPOModel(model, video.token_id, fused), tokenizer, frames, video)


def freeze(model: DPOModel, vision: bool, projector: bool) -> None:
    inner = model.hf.model
    for module, frozen in ((inner.vision_tower, vision), (inner.multi_modal_projector, projector),
                           (inner.vision_resampler, projector)):
        for p in module.parameters():
            p.requires_grad_(not frozen)


class DPOModel(nn.Module):
    """What the DeepSpeed engine wraps: the transformers model plus the log-prob head.

    `forward` returns summed answer log-probs and answer lengths per sequence, each
    [2 x pairs] float32. Going through the engine (rather than calling submodules directly) keeps
    ZeRO-3's forward bookkeeping intact.
    """

    def __init__(self, hf_model: nn.Module, video_token_id: int, fused: bool):
        super().__init__()
        self.hf = hf_model
        self.head = LogProbHead(hf_model.lm_head, fused)
        self.video_token_id = video_token_id

    def forward(self, input_ids, position_ids, attention_mask, labels, seq_index,
                pixel_values_videos, video_of_slot) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.hf.model
        embeds = inner.get_input_embeddings()(input_ids)
        vision_trains = any(p.requires_grad for p in inner.multi_modal_projector.parameters())
        vision_trains |= any(p.requires_grad for p in inner.vision_tower.parameters())
        with torch.set_grad_enabled(vision_trains and torch.is_grad_enabled()):
            # Positional: the argument is `pixel_values` in transformers 5.17 and
            # `pixel_values_videos` in 5.24, both inside setup.py's range.
            feats = inner.get_video_features(pixel_values_videos).pooler_output
        if isinstance(feats, tuple | list):  # 5.17: one [frames, tokens, dim] tensor per video
            feats = torch.stack(feats).flatten(1, 2)
        feats = feats[video_of_slot].reshape(-1, feats.shape[-1]).to(embeds.dtype)
        slots = (input_ids == self.video_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, feats)
        hidden = inner.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        answer = labels != IGNORE
        token_logps = self.head(hidden[answer], labels[answer])
        seq = seq_index[answer]
        n = 2 * pixel_values_videos.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        return zeros.index_add(0, seq, token_logps), zeros.index_add(0, seq, torch.ones_like(token_logps))


def batch_inputs(batch: MicroBatch) -> dict[str, torch.Tensor]:
    return {
        "input_ids": batch.input_ids, "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask, "labels": batch.labels,
        "seq_index": batch.seq_index, "pixel_values_videos": batch.pixel_values_videos,
        "video_of_slot": batch.video_of_slot,
    }
