"""Random-initialised tiny Qwen2-VL / Qwen2.5-VL models built from configs, never downloaded.

The architecture at toy size, for tests of the Qwen families: 8-pixel patches merged 2 x 2 and
2 frames to a temporal patch, so a 32 x 32 frame pair gives 4 video tokens. The tokenizer is
trained on the given texts with Qwen's special tokens and a Qwen2-VL-style chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from safevid.models.preprocess import CLIP_MEAN, CLIP_STD
from safevid.models.tokenizer import train_tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
QWEN_SPECIALS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Qwen2-VL-Instruct's template: a default system turn, vision items as
# <|vision_start|><pad><|vision_end|>, no BOS.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

PATCH, MERGE, TEMPORAL_PATCH = 8, 2, 2
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64  # frames of 32 x 32 .. 64 x 64 keep their size


def train_qwen_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024):
    """A sentencepiece tokenizer with Qwen's special tokens: eos <|im_end|>, pad <|endoftext|>,
    no BOS."""
    tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size, specials=QWEN_SPECIALS,
                          chat_template=QWEN_CHAT_TEMPLATE)
    tok.add_bos_token = False
    tok.bos_token = None
    tok.eos_token = IM_END
    tok.pad_token = ENDOFTEXT
    tok.save_pretrained(str(out_dir))
    return tok


def tiny_qwen2_vl_config(version: str, vocab_size: int, ids: dict[str, int]):
    """The config of a tiny Qwen2-VL (`version` "2") or Qwen2.5-VL ("2.5")."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        # head_dim 16: the three mrope sections split its 8 frequencies.
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        pad_token_id=ids["pad"], bos_token_id=None, eos_token_id=ids["eos"], tie_word_embeddings=False,
    )
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL_PATCH)
    tokens = dict(video_token_id=ids["video"], image_token_id=ids["image"],
                  vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    if version == "2":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    if version == "2.5":
        # window_size is in pixels: one window is 2 x 2 merged tokens; block 1 attends fully.
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, tokens_per_second=2,
                      window_size=2 * PATCH * MERGE, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)
    raise ValueError(f"version must be '2' or '2.5', got {version!r}")


def save_processor_configs(out_dir: Path) -> None:
    """Image and video processor configs with the tiny patch sizes and pixel bounds."""
    common = {
        "patch_size": PATCH, "temporal_patch_size": TEMPORAL_PATCH, "merge_size": MERGE,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_resize": True, "do_rescale": True, "do_normalize": True, "rescale_factor": 1 / 255,
        "processor_class": "Qwen2VLProcessor",
    }
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps({**common, "image_processor_type": "Qwen2VLImageProcessor"}, indent=2))
    (out_dir / "video_preprocessor_config.json").write_text(
        json.dumps({**common, "video_processor_type": "Qwen2VLVideoProcessor"}, indent=2))


def build_tiny_qwen2_vl(texts: Iterable[str], out_dir: str | Path, version: str = "2", seed: int = 0,
                        vocab_size: int = 1024) -> Path:
    """A tiny Qwen2-VL ("2") or Qwen2.5-VL ("2.5") and its tokenizer, trained on `texts`, saved to
    `out_dir` with processor configs."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    out_dir = Path(out_dir)
    tok = train_qwen_tokenizer(texts, out_dir, vocab_size)
    ids = dict(zip(("video", "image", "vision_start", "vision_end", "pad", "eos"),
                   tok.convert_tokens_to_ids([VIDEO_PAD, IMAGE_PAD, VISION_START, VISION_END,
                                              ENDOFTEXT, IM_END]), strict=True))
    cfg = tiny_qwen2_vl_config(version, len(tok), ids)
    model_cls = Qwen2VLForConditionalGeneration if version == "2" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.save_pretrained(str(out_dir))
    save_processor_configs(out_dir)
    return out_dir
