"""The Qwen2-VL / Qwen2.5-VL families against transformers' own processor and model code, on tiny
random-initialised models built from configs."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from safevid.demo_assets import demo_texts
from safevid.models.qwen2_vl import Qwen2VLFamily, Qwen25VLFamily, smart_resize
from safevid.models.tiny_qwen import build_tiny_qwen2_vl

FAMILIES = {"2": Qwen2VLFamily, "2.5": Qwen25VLFamily}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """version -> (checkpoint dir, family, model), built once for the module."""
    from transformers import AutoConfig

    built = {}
    for version, cls in FAMILIES.items():
        path = build_tiny_qwen2_vl(demo_texts(), tmp_path_factory.mktemp(f"qwen{version}"), version)
        fam = cls(str(path), AutoConfig.from_pretrained(path))
        hf = cls.load_model(str(path), torch.float32, "sdpa", False).eval()
        built[version] = (path, fam, hf)
    return built


def _frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _reference_patches(x: torch.Tensor, p: int, m: int, tp: int) -> torch.Tensor:
    """Qwen's documented patch order written as loops: temporal step, then the merge blocks in
    row-major order, then the patches inside a block; each patch flattened (C, T, P, P)."""
    if len(x) % tp:
        x = torch.cat([x, x[-1:].expand(tp - len(x) % tp, -1, -1, -1)])
    _, _, height, width = x.shape
    rows = []
    for t in range(len(x) // tp):
        for bh in range(height // p // m):
            for bw in range(width // p // m):
                for ih in range(m):
                    for iw in range(m):
                        y, z = (bh * m + ih) * p, (bw * m + iw) * p
                        patch = x[t * tp:(t + 1) * tp, :, y:y + p, z:z + p]  # [T, C, P, P]
                        rows.append(patch.transpose(0, 1).flatten())
    return torch.stack(rows)


def _normalised(fam: Qwen2VLFamily, frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(fam.mean).view(1, 3, 1, 1)) / torch.tensor(fam.std).view(1, 3, 1, 1)


# ---- data side --------------------------------------------------------------------------------


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

    cases = [(32, 32, 16, 1024, 4096), (37, 71, 16, 1024, 4096), (480, 640, 28, 128 * 784, 768 * 784),
             (1080, 1920, 28, 128 * 784, 768 * 784), (20, 300, 16, 1024, 4096), (90, 40, 16, 1024, 4096),
             (224, 224, 28, 3136, 12845056), (17, 23, 16, 1024, 4096)]
    for case in cases:
        assert smart_resize(*case) == hf_resize(*case), case


def test_family_reads_checkpoint_and_is_light(tiny):
    from transformers import AutoConfig

    from safevid.models.family import family_class

    for version, cls in FAMILIES.items():
        path, fam, _ = tiny[version]
        assert family_class("auto", str(path)) is cls
        assert (fam.patch_size, fam.merge_size, fam.temporal_patch_size) == (8, 2, 2)
        assert (fam.min_pixels, fam.max_pixels) == (32 * 32, 64 * 64)
        assert fam.context_window() == 4096 and fam.position_rows == 3
        config = AutoConfig.from_pretrained(path)
        start = time.perf_counter()
        cls(str(path), config)
        assert time.perf_counter() - start < 0.5
        # It goes to the prefetch thread: plain numbers only, nothing of the model.
        blob = pickle.dumps(fam)
        assert len(blob) < 2000 and b"torch" not in blob
    assert tiny["2.5"][1].tokens_per_second == 2


def test_single_frame_matches_hf_image_processor(tiny):
    """One frame, repeated to a temporal patch, is what Qwen's (PIL) image processor makes of an
    image: same values and the same patch layout."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    fam = tiny["2"][1]
    proc = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                    min_pixels=fam.min_pixels, max_pixels=fam.max_pixels)
    for height, width in ((32, 48), (64, 32), (48, 48)):  # sizes the pixel bounds keep
        frame = _frames(1, height, width, seed=height + width)
        ours = fam.prepare_video(frame)
        ref = proc(images=[frame[0]], return_tensors="pt")
        assert torch.equal(ours.grid_thw, ref["image_grid_thw"][0])
        torch.testing.assert_close(ours.pixels, ref["pixel_values"], atol=1e-6, rtol=0)
    # Resized: torchvision's uint8 kernel (ours) and PIL's bicubic differ by at most one level.
    frame = _frames(1, 37, 71, seed=3)
    ours, ref = fam.prepare_video(frame), proc(images=[frame[0]], return_tensors="pt")
    assert torch.equal(ours.grid_thw, ref["image_grid_thw"][0])
    assert (ours.pixels - ref["pixel_values"]).abs().max() <= 1 / 255 / min(fam.std) + 1e-5


def test_matches_hf_video_processor(tiny, tmp_path):
    """Bit for bit what transformers' video processor gives (it needs torchvision)."""
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    # The tiny checkpoint's settings, and Qwen2-VL's own (14-pixel patches, the class defaults).
    qwen = Qwen2VLFamily(str(tmp_path), Qwen2VLConfig())
    for fam, shapes in ((tiny["2"][1], [(5, 37, 71), (7, 90, 40), (2, 200, 200), (1, 17, 23)]),
                        (qwen, [(8, 360, 640), (5, 1080, 1920), (4, 100, 150)])):
        proc = Qwen2VLVideoProcessor(patch_size=fam.patch_size, merge_size=fam.merge_size,
                                     temporal_patch_size=fam.temporal_patch_size,
                                     size={"shortest_edge": fam.min_pixels, "longest_edge": fam.max_pixels})
        for shape in shapes:
            frames = _frames(*shape)
            ours = fam.prepare_video(frames)
            ref = proc(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
            assert torch.equal(ours.grid_thw, ref["video_grid_thw"][0]), shape
            assert torch.equal(ours.pixels, ref["pixel_values_videos"]), shape


@pytest.mark.parametrize("count,height,width", [(4, 32, 32), (5, 32, 48), (3, 64, 32), (1, 48, 64)])
def test_video_patches_layout_and_grid(tiny, count, height, width):
    fam = tiny["2"][1]
    frames = _frames(count, height, width, seed=count)
    video = fam.prepare_video(frames)
    t = -(-count // 2)
    assert video.grid_thw.tolist() == [t, height // 8, width // 8]
    assert video.grid_thw.dtype == torch.long
    assert video.tokens == t * (height // 16) * (width // 16)
    expected = _reference_patches(_normalised(fam, frames), 8, 2, 2)
    torch.testing.assert_close(video.pixels, expected, atol=1e-5, rtol=0)


def test_resize_keeps_aspect_within_pixel_bounds(tiny):
    fam = tiny["2"][1]
    for height, width in ((20, 300), (90, 40), (200, 200), (17, 23)):
        video = fam.prepare_video(_frames(2, height, width))
        _, gh, gw = video.grid_thw.tolist()
        assert (gh * 8, gw * 8) == smart_resize(height, width, 16, fam.min_pixels, fam.max_pixels)
        assert video.pixels.shape == (gh * gw, 3 * 2 * 8 * 8)


def test_second_per_grid_from_timestamps(tiny):
    fam2, fam25 = tiny["2"][1], tiny["2.5"][1]
    frames = _frames(4, 32, 32)
    assert fam2.prepare_video(frames).second_per_grid is None
    assert fam25.prepare_video(frames).second_per_grid == pytest.approx(1.0)  # 2 fps default
    assert fam25.prepare_video(frames, {"timestamps": [0.0]}).second_per_grid == pytest.approx(1.0)
    meta = {"timestamps": [0.4, 1.2, 2.0, 2.8]}  # 0.8 s apart: 1.25 fps
    assert fam25.prepare_video(frames, meta).second_per_grid == pytest.approx(1.6)


def _sequence(fam: Qwen2VLFamily, tokens: int, before: int = 5, after: int = 7) -> list[int]:
    ids = list(range(20, 20 + before)) + [fam.video_token_id] * tokens + list(range(30, 30 + after))
    return ids


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_positions_match_get_rope_index(tiny, version):
    _, fam, hf = tiny[version]
    # Many temporal steps on a small grid puts the temporal positions past the spatial ones.
    cases = [(8, 32, 32, None), (5, 48, 32, {"timestamps": [0, 0.25, 0.5, 0.75, 1.0]}),
             (4, 32, 64, {"timestamps": [0.0, 1 / 3, 2 / 3, 1.0]}), (2, 64, 64, {"timestamps": [0, 0.8]}),
             (12, 32, 32, {"timestamps": [i * 0.1 for i in range(12)]})]
    for count, height, width, meta in cases:
        video = fam.prepare_video(_frames(count, height, width), meta)
        ids = _sequence(fam, video.tokens)
        ours = fam.positions(ids, video)
        input_ids = torch.tensor([ids])
        kwargs = {}
        if version == "2.5":
            assert video.second_per_grid != 1 or meta is None
            kwargs["second_per_grid_ts"] = torch.tensor([video.second_per_grid])
        ref, _ = hf.model.get_rope_index(
            input_ids, mm_token_type_ids=(input_ids == fam.video_token_id).int() * 2,
            video_grid_thw=video.grid_thw[None], **kwargs)
        assert ours.shape == (3, len(ids)) and ours.dtype == torch.long
        assert torch.equal(ours, ref[:, 0]), (count, height, width, meta)


def test_positions_without_video_and_bad_runs(tiny):
    fam = tiny["2"][1]
    video = fam.prepare_video(_frames(2, 32, 32))
    assert torch.equal(fam.positions([5, 6, 7], video), torch.arange(3).expand(3, 3))
    ids = _sequence(fam, video.tokens)
    with pytest.raises(ValueError, match="placeholders"):
        fam.positions(ids[:-8] + [1] + ids[-8:], video)  # one placeholder too few
    with pytest.raises(ValueError, match="placeholders"):
        fam.positions([fam.video_token_id, 1] + ids, video)  # a second, separate run


# ---- model side -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_video_features_match_hf(tiny, version):
    _, fam, hf = tiny[version]
    videos = [fam.prepare_video(_frames(4, 32, 48, seed=1)), fam.prepare_video(_frames(3, 64, 32, seed=2))]
    pixels = torch.cat([v.pixels for v in videos])
    grid = torch.stack([v.grid_thw for v in videos])
    frames = torch.tensor([len(v.pixels) for v in videos])
    with torch.no_grad():
        ours = fam.video_features(hf, pixels, grid, frames)
        ref = hf.model.get_video_features(pixels, grid, return_dict=True).pooler_output
    assert [f.shape for f in ours] == [(v.tokens, 64) for v in videos]
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_forward_through_our_pieces_matches_hf(tiny, version):
    _, fam, hf = tiny[version]
    video = fam.prepare_video(_frames(6, 32, 48, seed=5), {"timestamps": [0, 0.3, 0.6, 0.9, 1.2, 1.5]})
    ids = _sequence(fam, video.tokens)
    input_ids = torch.tensor([ids])
    grid = video.grid_thw[None]
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(input_ids)
        feats = torch.cat(fam.video_features(hf, video.pixels, grid, torch.tensor([len(video.pixels)])))
        embeds = embeds.masked_scatter((input_ids == fam.video_token_id).unsqueeze(-1), feats)
        position_ids = fam.lm_position_ids(fam.positions(ids, video)[:, None], torch.arange(len(ids))[None])
        assert position_ids.shape == (4, 1, len(ids))
        hidden = fam.language_model(hf)(inputs_embeds=embeds, attention_mask=None,
                                        position_ids=position_ids, use_cache=False).last_hidden_state
        ours = hf.lm_head(hidden)
        kwargs = {"second_per_grid_ts": torch.tensor([video.second_per_grid])} if version == "2.5" else {}
        ref = hf(input_ids=input_ids, pixel_values_videos=video.pixels, video_grid_thw=grid,
                 mm_token_type_ids=(input_ids == fam.video_token_id).int() * 2, **kwargs).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_freeze_and_vision_modules(tiny):
    _, fam, hf = tiny["2.5"]
    fam.freeze(hf, vision=True, projector=False)
    visual = hf.model.visual
    assert not any(p.requires_grad for p in visual.blocks.parameters())
    assert not any(p.requires_grad for p in visual.patch_embed.parameters())
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert all(p.requires_grad for p in fam.language_model(hf).parameters())
    assert fam.vision_modules(hf) == [visual]
    assert hf.config.video_token_id == fam.video_token_id
    fam.freeze(hf, vision=False, projector=False)
    assert all(p.requires_grad for p in visual.parameters())


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_load_with_flex_for_text_and_sdpa_for_vision(tiny, version):
    path, fam, _ = tiny[version]
    for attn in ({"text_config": "flex_attention", "vision_config": "sdpa"}, "flex_attention"):
        hf = type(fam).load_model(str(path), torch.float32, attn, False)
        assert hf.model.language_model.config._attn_implementation == "flex_attention"
        assert hf.model.language_model.layers[0].self_attn.config._attn_implementation == "flex_attention"
        assert hf.model.visual.config._attn_implementation == "sdpa"
        assert hf.config.use_cache is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention compiles for seconds on CPU")
@pytest.mark.parametrize("version", ["2", "2.5"])
def test_flex_text_attention_matches_sdpa(tiny, version):
    from safevid.models.attention import allowed, block_mask

    path, fam, _ = tiny[version]
    flex = type(fam).load_model(str(path), torch.float32, "flex_attention", False).cuda().eval()
    sdpa = type(fam).load_model(str(path), torch.float32, "sdpa", False).cuda().eval()
    video = fam.prepare_video(_frames(4, 32, 48))
    ids = _sequence(fam, video.tokens, after=40)
    group = torch.zeros(1, len(ids), dtype=torch.long, device="cuda")
    branch = torch.zeros_like(group)
    text_positions = torch.arange(len(ids))[None]
    position_ids = fam.lm_position_ids(fam.positions(ids, video)[:, None], text_positions).cuda()
    embeds = sdpa.get_input_embeddings()(torch.tensor([ids], device="cuda"))
    with torch.no_grad():
        a = fam.language_model(flex)(inputs_embeds=embeds, attention_mask=block_mask(group, branch),
                                     position_ids=position_ids, use_cache=False).last_hidden_state
        b = fam.language_model(sdpa)(inputs_embeds=embeds, attention_mask=allowed(group, branch),
                                     position_ids=position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ---- tokenizer and checkpoint -----------------------------------------------------------------


def test_checkpoint_loads_with_plain_transformers(tiny):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(tiny["2.5"][0])
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert not model.config.tie_word_embeddings


def test_chat_template_and_placeholder_run(tiny):
    from safevid.data.collate import VideoTokens, encode_prompt
    from safevid.models.family import load_tokenizer

    path, fam, _ = tiny["2"]
    tok = load_tokenizer(str(path))
    assert tok.bos_token_id is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Is it safe?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|video_pad|><|vision_end|>Is it safe?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    video = fam.prepare_video(_frames(4, 32, 48))
    ids = encode_prompt("Is it safe?", tok, VideoTokens(fam.video_token_id, video.tokens))
    slots = [i for i, t in enumerate(ids) if t == fam.video_token_id]
    assert len(slots) == video.tokens and slots == list(range(slots[0], slots[0] + video.tokens))
    assert ids[slots[0] - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids[slots[-1] + 1] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert fam.positions(ids, video).shape == (3, len(ids))
