"""The debug model: LLaVA-NeXT-Video architecture at toy size, built from a config, never downloaded."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from safevid.models.preprocess import FrameSpec
from safevid.models.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, train_tokenizer

TINY_IMAGE_SIZE = 32


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


def build_tiny_model(texts: Iterable[str], out_dir: str | Path, seed: int = 0,
                     vocab_size: int = 1024) -> Path:
    """Train the tokenizer on `texts`, build the model with a fixed seed, save both to `out_dir`."""
    from transformers import LlavaNextVideoForConditionalGeneration

    out_dir = Path(out_dir)
    tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size)
    cfg = tiny_llava_next_video_config(
        vocab_size=len(tok),
        video_token_id=tok.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg)
    model.save_pretrained(str(out_dir))
    FrameSpec(size=TINY_IMAGE_SIZE).save(out_dir)
    return out_dir
