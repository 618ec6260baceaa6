"""Random-initialised LLaVA-NeXT-Video models built from configs, never downloaded.

- the debug model: the architecture at toy size, for the demo and the tests;
- the 7B shape: llava-hf/LLaVA-NeXT-Video-7B-hf's config with fewer text layers, for
  measuring speed and memory on a GPU without its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from safevid.models.preprocess import FrameSpec
from safevid.models.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, train_tokenizer

TINY_IMAGE_SIZE = 32

# llava-hf/LLaVA-NeXT-Video-7B-hf's config.json, written out so that nothing is fetched:
# a CLIP ViT-L/14 vision tower at 336 px and a Vicuna-7B (llama-2-7B) text model.
LLAVA_NEXT_VIDEO_7B_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
LLAVA_NEXT_VIDEO_7B_TEXT = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    rms_norm_eps=1e-5, hidden_act="silu",
)
LLAVA_NEXT_VIDEO_7B = dict(
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    vision_feature_layer=-2, vision_feature_select_strategy="default", spatial_pool_mode="average",
    spatial_pool_stride=2, projector_hidden_act="gelu",
)


def tiny_llava_next_video_config(vocab_size: int, video_token_id: int, image_token_id: int,
                                 pad_token_id: int, bos_token_id: int, eos_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaNextVideoConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        video_token_index=video_token_id, image_token_index=image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        spatial_pool_mode="average", spatial_pool_stride=2,
        image_grid_pinpoints=[[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]],
        tie_word_embeddings=False,
    )


def llava_next_video_7b_config(vocab_size: int, video_token_id: int, image_token_id: int,
                               pad_token_id: int, bos_token_id: int, eos_token_id: int, *,
                               text_layers: int = 32, vision: dict | None = None,
                               text: dict | None = None):
    """The 7B config with `text_layers` language-model layers; `vision` and `text` override
    entries of the vision and text configs. The model's vocabulary stays at the 7B's 32064
    whatever `vocab_size` the tokenizer has, so the LM head and the log-prob kernels run at the
    real size (ids above the tokenizer's simply never occur)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    vision_cfg = CLIPVisionConfig(**{**LLAVA_NEXT_VIDEO_7B_VISION, **(vision or {})})
    text_cfg = LlamaConfig(
        **{**LLAVA_NEXT_VIDEO_7B_TEXT, "num_hidden_layers": text_layers, **(text or {})},
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    if text_cfg.vocab_size < vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens, the model only {text_cfg.vocab_size}")
    return LlavaNextVideoConfig(
        vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(),
        video_token_index=video_token_id, image_token_index=image_token_id,
        tie_word_embeddings=False, **LLAVA_NEXT_VIDEO_7B,
    )


def _build(texts: Iterable[str], out_dir: str | Path, make_config: Callable, seed: int,
           vocab_size: int, device: str | torch.device, dtype: torch.dtype) -> Path:
    """Train the tokenizer on `texts`, build the model with a fixed seed, save both to `out_dir`."""
    from transformers import LlavaNextVideoForConditionalGeneration

    out_dir = Path(out_dir)
    tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size)
    cfg = make_config(
        vocab_size=len(tok),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    # Built on `device`: initialising billions of parameters on a GPU takes a moment, on CPU
    # cores minutes.
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration(cfg).to(dtype)
    model.save_pretrained(str(out_dir))
    FrameSpec(size=cfg.vision_config.image_size).save(out_dir)
    return out_dir


def build_tiny_model(texts: Iterable[str], out_dir: str | Path, seed: int = 0,
                     vocab_size: int = 1024) -> Path:
    """The debug model and its tokenizer, trained on `texts`, saved to `out_dir`."""
    return _build(texts, out_dir, tiny_llava_next_video_config, seed, vocab_size, "cpu",
                  torch.float32)


def build_llava_next_video_from_config(texts: Iterable[str], out_dir: str | Path, text_layers: int,
                                       *, vision: dict | None = None, text: dict | None = None,
                                       seed: int = 0, vocab_size: int = 1024,
                                       device: str | torch.device = "cpu",
                                       dtype: torch.dtype = torch.float32) -> Path:
    """LLaVA-NeXT-Video-7B's architecture with `text_layers` text layers, random-initialised
    with a fixed seed on `device` in `dtype`, saved to `out_dir` with a sentencepiece tokenizer
    trained on `texts` and a 336 px frame spec. `vision` / `text` override config entries
    (smaller widths for a CPU run)."""

    def make_config(**ids):
        return llava_next_video_7b_config(**ids, text_layers=text_layers, vision=vision, text=text)

    return _build(texts, out_dir, make_config, seed, vocab_size, device, dtype)
