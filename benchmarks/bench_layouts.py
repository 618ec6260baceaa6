"""Row layouts side by side: padded vs packed vs shared-prefix, on the same pairs, in one run.

Two length mixes: the demo's own pairs (`demo`), and the same pairs with each prompt's text
lengthened until the prompt is about 4x the mean answer (`prompt4x`). For each layout one
training micro-step is timed: the policy's forward and backward plus the frozen reference's
forward, as in `safevid train`. Printed per layout: real-token fraction (real tokens / row
slots), tokens/s, pairs/s, peak memory, and ratios packed/padded and shared-prefix/packed.

The model is LLaVA-NeXT-Video's architecture, random-initialised from a config: the demo's
tiny vision tower (so the token counts are the demo's) and a wider language model, so that
the language model dominates the step as it does at 7B. Each layout's step is repeated
(--rounds, layouts interleaved) and the fastest kept; the machine may be shared.

Peak memory: on CUDA torch.cuda.max_memory_allocated() of the step above what was allocated
before it; on CPU the growth of the process's resident high-water mark over the step (VmHWM,
reset through /proc/self/clear_refs).

Then, at LLaVA-NeXT-Video-7B's sizes (16 frames x 144 tokens + 60 text tokens of prompt,
answers with the demo mix's spread scaled to a 300-token mean, 8 pairs per micro-batch, rows of
8,192, 32 layers x 4,096 wide): the attention FLOPs each layout's rows need with a dense
[R, 1, L, L] mask (SDPA computes every entry), with FlexAttention's block mask (128 x 128 blocks
that hold at least one allowed entry), and exactly (allowed entries only), with the mask's bytes.

    python benchmarks/bench_layouts.py            # CPU, fp32, sdpa_units, 16 layers x 512
    python benchmarks/bench_layouts.py --gpu      # CUDA, bf16, FlexAttention, 32 layers x 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_logprobs import _status_mib  # noqa: E402

LAYOUTS = {"padded": (False, False), "packed": (False, True), "shared-prefix": (True, True)}


def _reset_peak() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def _peak(base: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _status_mib("VmHWM") - base


def _pairs(assets: Path, n: int, mix: str, tokenizer) -> list:
    from safevid.data.stream import expand_shards, read_all_pairs

    pairs = read_all_pairs(expand_shards(str(assets / "shards" / "train-*.tar")), n)
    if mix == "prompt4x":
        mean_answer = sum(len(tokenizer(p.chosen)["input_ids"]) + len(tokenizer(p.rejected)["input_ids"])
                          for p in pairs) / (2 * len(pairs))
        for p in pairs:
            words = p.prompt.split()
            while len(tokenizer(p.prompt)["input_ids"]) < 4 * mean_answer:
                p.prompt += " " + " ".join(words)
    return pairs


def _step(model, batch, ref: bool) -> None:
    from safevid.data.collate import batch_inputs

    logps, _ = model(**batch_inputs(batch))
    logps.sum().backward()
    if ref:
        with torch.no_grad():
            model(**batch_inputs(batch))


def run(args) -> dict:
    from safevid.demo_assets import demo_texts, ensure_demo_assets
    from safevid.dpo import Batcher
    from safevid.models import attention
    from safevid.models.dpo_model import load
    from safevid.models.tiny import TINY_IMAGE_SIZE, build_llava_next_video_from_config

    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    assets = ensure_demo_assets(Path(args.assets))
    work = Path(tempfile.mkdtemp(prefix="bench_layouts."))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=32)
    text = dict(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                num_attention_heads=args.hidden // 128 if args.gpu else 8,
                num_key_value_heads=args.hidden // 128 if args.gpu else 8,
                max_position_embeddings=8192)
    model_dir = build_llava_next_video_from_config(
        demo_texts(), work / "model", text_layers=args.layers, vision=vision, text=text,
        device=device, dtype=dtype)
    backend = attention.choose("auto", device, shared_prefix=True, dtype=dtype)
    loaded = load(str(model_dir), dtype, fused=True, backend=backend)
    model = loaded.model.to(device).train()
    for p in loaded.family.vision_modules(model.hf):
        p.requires_grad_(False)
    results = {"device": torch.cuda.get_device_name() if args.gpu else "cpu",
               "backend": backend, "dtype": str(dtype), "mixes": {}}
    for mix in ("demo", "prompt4x"):
        pairs = _pairs(assets, args.pairs, mix, loaded.tokenizer)
        batches, stats = {}, {}
        for name, (shared, packing) in LAYOUTS.items():
            data = SimpleNamespace(max_answer_tokens=512, max_length=4096, max_prompt_length=0,
                                   shared_prefix=shared, packing=packing,
                                   max_tokens_per_row=args.row_tokens)
            batch = Batcher(loaded, data)(copy.deepcopy(pairs))
            batches[name] = batch.to(device, dtype)
            stats[name] = {"rows": batch.input_ids.shape[0], "width": batch.input_ids.shape[1],
                           "real_tokens": batch.tokens, "slots": batch.padded_tokens,
                           "real_fraction": batch.tokens / batch.padded_tokens,
                           "time_s": float("inf"), "peak_mib": 0.0}
            _step(model, batches[name], ref=True)  # warm-up (FlexAttention compiles here)
            model.zero_grad(set_to_none=True)
        for _ in range(args.rounds):
            for name, batch in batches.items():
                base = _reset_peak()
                t0 = time.perf_counter()
                _step(model, batch, ref=True)
                if args.gpu:
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                model.zero_grad(set_to_none=True)
                s = stats[name]
                s["time_s"] = min(s["time_s"], elapsed)
                s["peak_mib"] = max(s["peak_mib"], _peak(base))
        for s in stats.values():
            s["tokens_per_s"] = s["real_tokens"] / s["time_s"]
            s["pairs_per_s"] = len(pairs) / s["time_s"]
        results["mixes"][mix] = stats
    results["at_7b"] = attention_at_7b(args.seed)
    return results


def attention_at_7b(seed: int, pairs: int = 8, budget: int = 8192, layers: int = 32,
                    width: int = 4096, block: int = 128) -> dict:
    """Attention FLOPs (forward, QK^T and PV) and mask bytes per layout at the 7B's sizes."""
    from safevid.data.collate import EncodedPair, Layout, collate
    from safevid.models import attention
    from safevid.models.family import VideoInput

    class Plain:
        position_rows, video_token_id = 1, -1

        def positions(self, ids, video):
            return torch.arange(len(ids))[None]

    gen = torch.Generator().manual_seed(seed)
    prompt = [1] * (16 * 144 + 60)
    answers = (torch.rand(2 * pairs, generator=gen) * 400 + 100).long().tolist()  # 100..500
    enc = [EncodedPair(prompt, [2] * answers[2 * i], [3] * answers[2 * i + 1]) for i in range(pairs)]
    video = VideoInput(torch.zeros(1), 0)
    out = {}
    per_entry = 4 * width * layers  # 2 FLOPs per multiply-add, QK^T and PV
    for name, (shared, packing) in LAYOUTS.items():
        b = collate(enc, [video], [0] * pairs, Plain(), 0, Layout(shared, packing, budget))
        R, L = b.input_ids.shape
        allowed = attention.allowed(b.group, b.branch)[:, 0]
        real = (b.group >= 0)
        exact = int((allowed & real[:, :, None]).sum())
        nb = -(-L // block)
        pad = nb * block - L
        blocks = torch.nn.functional.pad(allowed & real[:, :, None], (0, pad, 0, pad))
        visited = int(blocks.view(R, nb, block, nb, block).any(4).any(2).sum())
        out[name] = {"rows": R, "width": L, "real_tokens": b.tokens,
                     "dense_mask_bytes": attention.mask_bytes("sdpa_mask", R, L),
                     "block_mask_bytes": attention.mask_bytes("flex", R, L, block),
                     "dense_tflops": R * L * L * per_entry / 1e12,
                     "flex_tflops": visited * block * block * per_entry / 1e12,
                     "exact_tflops": exact * per_entry / 1e12}
    return out


def print_table(r: dict) -> None:
    print(f"device: {r['device']}, attention {r['backend']}, {r['dtype']}")
    for mix, stats in r["mixes"].items():
        print(f"\nmix {mix}:")
        print(f"{'layout':<14} {'rows x L':>10} {'real tok':>9} {'real %':>7} {'step ms':>9} "
              f"{'tokens/s':>10} {'pairs/s':>8} {'peak MiB':>9}")
        for name, s in stats.items():
            print(f"{name:<14} {s['rows']:>4} x {s['width']:<5}{s['real_tokens']:>8} "
                  f"{100 * s['real_fraction']:>6.1f}% {1000 * s['time_s']:>9.1f} "
                  f"{s['tokens_per_s']:>10.0f} {s['pairs_per_s']:>8.2f} {s['peak_mib']:>9.1f}")
        pad, pk, sp = stats["padded"], stats["packed"], stats["shared-prefix"]
        print(f"pairs/s packed / padded = {pk['pairs_per_s'] / pad['pairs_per_s']:.2f}x, "
              f"shared-prefix / packed = {sp['pairs_per_s'] / pk['pairs_per_s']:.2f}x; "
              f"real tokens packed {100 * pk['real_fraction']:.1f}%")
    print("\nattention at LLaVA-NeXT-Video-7B sizes (8 pairs, rows of 8192, forward):")
    print(f"{'layout':<14} {'rows x L':>11} {'dense mask':>11} {'block mask':>11} "
          f"{'dense TFLOP':>12} {'flex TFLOP':>11} {'exact TFLOP':>12}")
    for name, a in r["at_7b"].items():
        print(f"{name:<14} {a['rows']:>4} x {a['width']:<6}{a['dense_mask_bytes'] / 2**20:>8.1f} MiB"
              f"{a['block_mask_bytes'] / 2**10:>8.1f} KiB {a['dense_tflops']:>12.2f} "
              f"{a['flex_tflops']:>11.2f} {a['exact_tflops']:>12.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--assets", default=".safevid/demo")
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-step")
    p.add_argument("--row-tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=None, help="language model width")
    p.add_argument("--layers", type=int, default=None, help="language model layers")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.gpu and not torch.cuda.is_available():
        print("bench_layouts: --gpu given but CUDA is not available", file=sys.stderr)
        return 2
    args.hidden = args.hidden or (4096 if args.gpu else 512)
    # The layers whose work the layouts change must dominate the step, as at 7B: fewer leave it
    # to the LM head, the vision tower and (on a GPU) launches. On a GPU the 7B's 32 (about
    # 6.5B parameters: 13 GB of bf16 weights, as much for gradients, and the step's
    # activations; no optimizer); on CPU 16.
    args.layers = args.layers or (32 if args.gpu else 16)
    results = run(args)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
