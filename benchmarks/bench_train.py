"""End-to-end DPO training: the plain twin against the fast path, and each switch alone, in one run.

Every variant is a real 2-rank (--world) ZeRO-3 run of `safevid train` (CPU processes over gloo, one
thread each, launched one after the other through `python -m safevid.launcher`) on the same
pairs in the same order (same shards, seed and steps), from the same random-initialised model:

    variant          layout                          log-probs  reference
    plain twin       padded: one row per answer,     plain      live: a frozen model's forward
                     so the video prompt runs twice             every micro-step
    + shared-prefix  [prompt|chosen|rejected] units  plain      live
                     packed into rows
    + fused          padded                          fused      live
    + precomputed    padded                          plain      precomputed
    fast path        shared-prefix, packed           fused      precomputed
    fast, unpacked   shared-prefix, one pair per     fused      precomputed
                     row (data.packing=false)

The last row is not one of the issue's variants: it shows what packing costs or saves. With
SDPA over a whole row and a dense [L, L] mask (`model.attention=sdpa_mask`), packing two
~730-token pairs into one row doubles the attention work those pairs need; the CPU default,
`sdpa_units`, runs SDPA once per unit of a row, as the GPU's FlexAttention block mask skips
the blocks no query may see, so packing costs no attention work there.

Precomputed reference log-probs are stamped with the row layout (padded or shared-prefix), so
each gets its own `safevid precompute-ref` run into its own directory. Both are timed and
reported as what they are: a one-off cost per data set, model and layout, paid back by every
later step.

The model: LLaVA-NeXT-Video's architecture (transformers' LlavaNextVideoForConditionalGeneration),
random-initialised from a config with a fixed seed and the demo's tokenizer. Its language model
is wider and deeper than the demo's (default 6 layers x 256, about 21M parameters against the
demo model's 0.26M; the count is printed) with the 7B's 32,064-token vocabulary, which matters
because the plain log-probs materialise [answer tokens x vocab] logits and the fused ones never
do. The vision tower is the demo's (2 layers x 32, frozen) with its patch size set so that
each of the shards' 4 frames gives 144 tokens after pooling, as LLaVA-NeXT-Video-7B's does
(`--frame-tokens 4` gives the demo model's count). That puts the prompt/answer proportion
near the 7B recipe's (prompts ~620 tokens, answers 20-110; the 7B's 16 frames give ~2,360 and
100-500): the proportion is what the shared prefix saves.

From each run's metrics.jsonl (rank 0 writes one record per optimizer step):
- pairs/s and tokens/s: the step's pairs and real tokens over its wall time, summed over the
  steps after the first --warmup (thread pools, allocator and ZeRO-3's parameter tracing
  settle in the first steps). tokens/s counts the tokens each layout really runs, so it does
  not compare across layouts (shared-prefix rows hold each prompt once); pairs/s does.
  Every variant runs --rounds times, the variants taking turns (reversed every other round),
  and each keeps its fastest round: on a small shared machine the speed drifts by tens of
  percent over minutes, more than some of the differences measured.
- peak memory: the process's resident high-water mark (ru_maxrss) at the last step, the
  largest of the ranks. It includes what such a process holds before any training (python,
  torch, deepspeed, transformers and the trainer's modules: the "import baseline" printed
  above the table, measured in a bare process that only imports them). A high-water mark
  also keeps what the allocator has not given back, so differences under ~100 MiB are noise.
- step-1 loss and grad norm, clipping off: the policy starts as the reference, so the step-1
  loss is log 2 up to rounding in every variant; the grad norm is what shows that every path
  computes the same gradient. Both must agree within --rtol (1e-5 in fp32). The loss of the last step
  (after the same updates on the same pairs) is compared too, and printed.

Model FLOPs of one optimizer step, all ranks together, so that MFU = achieved FLOP/s / peak
FLOP/s can be read off for any machine (the CPU is named; `--peak-tflops` prints the MFU):
- language model (trainable): 6 x N_layers x T over the T real tokens the variant runs, plus
  6 x V x H x A for the LM head at the A answer-token predictions (the only place it runs);
- attention: 4 x H x (causal query-key entries) per layer forward, x3 with the backward;
- live reference: the same forward once more (2 x N_layers x T + 2 x V x H x A + attention);
- vision tower and projector (frozen): forward only, 2 x parameters x tokens, counted once per
  pair and model (an upper bound: a video that several pairs of a micro-batch share is
  encoded once).
T and A come from the runs themselves: for the same step, padded tokens - shared-prefix tokens
= the prompts' tokens (padded rows hold each prompt twice). The attention term uses the step's
mean prompt and answer lengths. Padding, masked entries (`sdpa_mask` computes the whole dense
[L, L] mask; `sdpa_units` those of each unit) and the fused path's recomputed logits are not
model FLOPs.

The table's "CPU share" column (the kept run's CPU time over wall time x cores) drops for a
run that had to share the cores with other work.

On a GPU (`--gpu`): one rank per visible GPU (NCCL), bf16 as the trainer picks it there, a
wider default model (8 layers x 2048, about 0.6B parameters), 16 pairs per step in micro-steps
of 8, and by default only the variants that the targets and the FLOPs estimate need (`plain
twin`, `+ shared-prefix`, `+ precomputed`, `fast path`; `--variants` picks others). Peak memory
is then the trainer's `memory/peak_gpu_mib` (torch.cuda.max_memory_allocated, the largest rank),
the step-1 tolerance is bf16's (--rtol 2e-2: the layouts add up the same numbers in another
order) and MFU is printed against `--peak-tflops` (default 989, the H100/H200 SXM's dense bf16
peak).

    python benchmarks/bench_train.py                    # about 9 min on 2 cores
    python benchmarks/bench_train.py --steps 10 --keep --json bench_train.json
    python benchmarks/bench_train.py --gpu              # 6 process groups, about 6 min on one H200
    python benchmarks/bench_train.py --gpu --variants "fast path"   # 3 groups: 217 s on one H200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
RECIPE = "1"  # bump when build_model changes, so that cached bench models are rebuilt

# name: (layout, fused log-probs, reference)
VARIANTS: dict[str, tuple[str, bool, str]] = {
    "plain twin": ("padded", False, "live"),
    "+ shared-prefix": ("shared-prefix", False, "live"),
    "+ fused": ("padded", True, "live"),
    "+ precomputed": ("padded", False, "precomputed"),
    "fast path": ("shared-prefix", True, "precomputed"),
    "fast, unpacked": ("shared-prefix unpacked", True, "precomputed"),
}
# layout: (data.shared_prefix, data.packing)
LAYOUTS = {"padded": (False, False), "shared-prefix": (True, True),
           "shared-prefix unpacked": (True, False)}


def layout_args(layout: str) -> list[str]:
    shared, packing = LAYOUTS[layout]
    return [f"data.shared_prefix={str(shared).lower()}", f"data.packing={str(packing).lower()}"]


def stamp(layout: str) -> str:
    """The layout a precomputed reference file is stamped with (packing does not count)."""
    return "shared-prefix" if LAYOUTS[layout][0] else "padded"


GPU_VARIANTS = ("plain twin", "+ shared-prefix", "+ precomputed", "fast path")
# The dense bf16 peak of an H100/H200 SXM (the matrix units without sparsity), for MFU.
GPU_PEAK_TFLOPS = 989.0


def child_env(gpu: bool) -> dict[str, str]:
    """CPU: one thread per rank, the ranks share the cores. GPU: this environment, without
    a CPU accelerator left over from CPU work (it would train on the CPU) or this process's
    own rank variables, and offline (a hub lookup would only wait for its timeout)."""
    from safevid.launcher.local import cpu_job_env

    env = cpu_job_env()
    if gpu:
        env.pop("DS_ACCELERATOR", None)
        env.pop("OMP_NUM_THREADS", None)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def build_model(out: Path, hidden: int, layers: int, frame_tokens: int, seed: int) -> Path:
    """The bench model, built once per shape into `out` (a marker lets a rerun reuse it).

    Language model: LLaVA-NeXT-Video-7B's layout (Llama MLP at 2.6875x, multi-head attention
    with 64-wide heads, the 32,064-token vocabulary) at CPU widths. Vision tower: the demo's,
    with patch and input size set so that a frame gives `frame_tokens` tokens after the 2 x 2
    pooling.
    """
    from safevid.demo_assets import demo_texts
    from safevid.models.tiny import build_llava_next_video_from_config

    marker = out / "COMPLETE"
    if marker.is_file() and marker.read_text() == RECIPE:
        return out
    shutil.rmtree(out, ignore_errors=True)
    side = 2 * math.isqrt(frame_tokens)  # patches per side before pooling
    # The shards hold 32 px frames: patches of 32 / side px where that is whole (the demo's
    # 8 px for 4 tokens), else 2 px patches of frames resized to 2 x side px.
    image = 32 if 32 % side == 0 else 2 * side
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image, patch_size=image // side, projection_dim=32)
    text = dict(hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                max_position_embeddings=4096)
    build_llava_next_video_from_config(demo_texts(), out, text_layers=layers, vision=vision,
                                       text=text, seed=seed)
    marker.write_text(RECIPE)
    return out


def model_shape(model_dir: Path) -> dict:
    """What the FLOPs estimate needs, from config.json; the exact parameter count from the
    safetensors headers (no weights read)."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    h, inter, kv = t["hidden_size"], t["intermediate_size"], t["num_key_value_heads"]
    head_dim = h // t["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter  # q, o, k, v; gate, up, down
    hv, side = v["hidden_size"], v["image_size"] // v["patch_size"]
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return {"hidden": h, "layers": t["num_hidden_layers"], "intermediate": inter,
            "vocab": t["vocab_size"], "lm_layer_params": t["num_hidden_layers"] * per_layer,
            "head_params": t["vocab_size"] * h,
            "vision_params": v["num_hidden_layers"] * (4 * hv * hv + 2 * hv * v["intermediate_size"])
            + 3 * hv * v["patch_size"] ** 2,
            "projector_params": hv * h + h * h,
            "patches_per_frame": side * side + 1,
            "tokens_per_frame": (side // cfg.get("spatial_pool_stride", 2)) ** 2,
            "total_params": total}


def pairs_shards(assets: Path, pairs: int, world: int) -> str:
    """The first training shards that hold `pairs` pairs, at least one per rank (so that both
    ranks of a precompute have shards to score): the precompute runs score exactly these, and
    every variant draws its steps from them."""
    index = json.loads((assets / "shards" / "index.json").read_text())
    chosen, total = [], 0
    for shard in index["splits"]["train"]["shards"]:
        if total >= pairs and len(chosen) >= world:
            break
        chosen.append(str(assets / "shards" / shard["file"]))
        total += shard["pairs"]
    return ",".join(chosen)


def launch(command: str, overrides: list[str], log: Path, world: int, gpu: bool) -> dict:
    """One process group of `world` ranks, start to end. Its output goes to `log`. Returns its wall time
    and the share of the machine's CPU time its processes got: well below 1 (the ranks also
    wait on each other and on files) means other work competed for the cores, and the times
    of that run are upper bounds."""
    import resource

    cmd = [sys.executable, "-m", "safevid.launcher", "--command", command,
           "--nproc-per-node", str(world), str(CONFIG), *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=child_env(gpu), cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{command} failed ({done.returncode}), see {log}:\n{tail}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_share": cpu / (wall * (os.cpu_count() or 1))}


def import_baseline_mib() -> float:
    """Resident high-water mark of a process that has only imported what a rank imports."""
    code = ("import resource, torch, deepspeed, transformers, safevid.train, safevid.dpo, "
            "safevid.engine, safevid.models.dpo_model; "
            "from transformers import LlavaNextVideoForConditionalGeneration; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(False), cwd=REPO,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def precompute_summary(log: Path) -> dict:
    """Pairs scored and seconds from the precompute's own closing line (no start-up)."""
    text = log.read_text()
    pairs = re.search(r"reference log-probs of (\d+) pairs", text)
    secs = re.search(r"written for \d+ shards in ([0-9.]+)s", text)
    return {"pairs": int(pairs.group(1)) if pairs else 0,
            "compute_s": float(secs.group(1)) if secs else float("nan")}


def summarise(rows: list[dict], warmup: int, memory_key: str) -> dict:
    timed = rows[warmup:]
    step_s = sum(r["step_s"] for r in timed)
    return {
        "steps": len(rows), "timed_steps": len(timed),
        "pairs_per_s": sum(r["pairs"] for r in timed) / step_s,
        "tokens_per_s": sum(r["tokens"] for r in timed) / step_s,
        "step_s": step_s / len(timed), "best_step_s": min(r["step_s"] for r in timed),
        "peak_mib": max(r[memory_key] for r in rows),
        "loss_1": rows[0]["loss"], "grad_norm_1": rows[0]["grad_norm"],
        "losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
        "tokens": [r["tokens"] for r in rows], "pairs": [r["pairs"] for r in rows],
        "step_times": [r["step_s"] for r in rows],
    }


def step_flops(shape: dict, padded: bool, prompts: int, answers: int, pairs: int,
               live_ref: bool, frames: int) -> float:
    """Model FLOPs of one optimizer step (see the module docstring): `prompts` and `answers`
    are the step's prompt and answer tokens, each prompt counted once."""
    p, a = prompts / pairs, answers / (2 * pairs)  # mean prompt, mean answer
    if padded:  # two causal rows [prompt|answer] per pair
        tokens, entries = 2 * prompts + answers, pairs * (p + a) ** 2
    else:  # the prompt once; each answer sees it and itself causally
        tokens, entries = prompts + answers, pairs * (p * p / 2 + 2 * a * p + a * a)
    forward = (2 * shape["lm_layer_params"] * tokens + 2 * shape["head_params"] * answers
               + 4 * shape["hidden"] * entries * shape["layers"])
    vision = 2 * frames * pairs * (shape["vision_params"] * shape["patches_per_frame"]
                                   + shape["projector_params"] * shape["tokens_per_frame"])
    return 3 * forward + vision + (forward + vision if live_ref else 0.0)


def add_flops(results: dict, frames: int) -> None:
    """FLOPs per step and achieved FLOP/s of every variant, from the per-step token counts of
    both layouts (the same pairs in every run)."""
    variants = results["variants"]
    # Every variant of one layout kind runs the same tokens (check_targets holds them to it).
    padded, shared = (next(r["tokens"] for n, r in variants.items() if stamp(VARIANTS[n][0]) == kind)
                      for kind in ("padded", "shared-prefix"))
    for name, r in variants.items():
        layout, _, ref = VARIANTS[name]
        per_step = [step_flops(results["shape"], stamp(layout) == "padded", tp - ts, 2 * ts - tp, n,
                               ref == "live", frames)
                    for tp, ts, n in zip(padded, shared, r["pairs"], strict=True)]
        timed = slice(r["steps"] - r["timed_steps"], None)
        r["flops_per_step"] = sum(per_step[timed]) / r["timed_steps"]
        r["flops_per_s"] = sum(per_step[timed]) / sum(r["step_times"][timed])


def cpu_name() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []

    def field(key: str) -> str | None:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), None)

    mhz = field("cpu MHz")
    return (f"{field('model name') or 'unknown CPU'}, {os.cpu_count()} cores"
            + (f" at {float(mhz):.0f} MHz" if mhz else ""))


def gpu_name(world: int) -> str:
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{world} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"


def run(args: argparse.Namespace) -> dict:
    import torch

    from safevid.demo_assets import NUM_FRAMES, ensure_demo_assets

    world, gpu, variants = args.world, args.gpu, args.variants

    assets = ensure_demo_assets(Path(args.assets)).resolve()
    model = build_model(Path(args.model_cache).resolve()
                        / f"llava_next_video_h{args.hidden}_l{args.layers}_f{args.frame_tokens}",
                        args.hidden, args.layers, args.frame_tokens, args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench_train."))
    results: dict = {
        "machine": gpu_name(world) if gpu else cpu_name(), "torch": torch.__version__,
        "world": world, "gpu": gpu, "memory": "GPU allocated" if gpu else "RSS",
        "load_before": os.getloadavg()[0], "model": str(model), "shape": model_shape(model),
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "pairs_per_step": args.pairs_per_step, "micro_batch_pairs": args.micro_batch_pairs,
        "work": str(work), "import_baseline_mib": 0.0 if gpu else import_baseline_mib(),
        "precompute": {},
        "variants": {},
    }
    common = [f"demo.assets_dir={assets}", f"model.name_or_path={model}",
              f"data.shards={pairs_shards(assets, args.steps * args.pairs_per_step, world)}",
              # No evaluation: with data.eval_max_pairs=0 the end-of-run pass over the
              # training set (forwards of every pair, outside the step timings) is skipped too.
              "data.eval_shards=null", "data.eval_max_pairs=0", "train.eval_every=0",
              f"train.max_steps={args.steps}", f"train.pairs_per_step={args.pairs_per_step}",
              f"train.micro_batch_pairs={args.micro_batch_pairs}", f"train.seed={args.seed}",
              "train.max_grad_norm=1e6",  # clipping off: step-1 grad norms compare raw
              # The final checkpoint (save_every=0) is written after the last step's timing.
              "train.save_every=0", "train.export_hf=false", "train.report_to=none"]
    memory_key = "memory/peak_gpu_mib" if gpu else "memory/peak_rss_mib"
    t_all = time.perf_counter()
    try:
        for kind in ("padded", "shared-prefix"):
            # Scored in the layout and with the log-probs of the first variant that reads
            # them (plain and fused, packed and unpacked rows agree to rounding).
            layout, fused = next(((VARIANTS[n][0], VARIANTS[n][1]) for n in variants
                                  if stamp(VARIANTS[n][0]) == kind and VARIANTS[n][2] == "precomputed"),
                                 (None, False))
            if layout is None:  # no variant reads this kind
                continue
            out = work / f"precompute-{kind}"
            out.mkdir(parents=True)
            print(f"bench_train: precompute-ref, {layout} rows ...", file=sys.stderr, flush=True)
            ran = launch("precompute-ref", [*common, *layout_args(layout), f"output_dir={out}",
                                            f"train.fused_logprobs={str(fused).lower()}",
                                            f"train.ref_logps_dir={work / f'ref-{kind}'}"],
                         out / "log.txt", world, gpu)
            results["precompute"][kind] = {**ran, **precompute_summary(out / "log.txt")}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.rounds):
            # The machine's speed drifts over minutes (shared cores, other work): the variants
            # take turns, in reverse order every other round, and each keeps its fastest round.
            for name in list(variants)[::-1 if i % 2 else 1]:
                layout, fused, ref = VARIANTS[name]
                out = work / f"round{i + 1}-{re.sub(r'[^a-z]+', '-', name).strip('-')}"
                out.mkdir(parents=True)
                over = [*common, *layout_args(layout), f"train.reference={ref}",
                        f"train.fused_logprobs={str(fused).lower()}", f"output_dir={out}"]
                if ref == "precomputed":
                    over.append(f"train.ref_logps_dir={work / f'ref-{stamp(layout)}'}")
                print(f"bench_train: round {i + 1}/{args.rounds}, train, {name} ...",
                      file=sys.stderr, flush=True)
                ran = launch("train", over, out / "log.txt", world, gpu)
                rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                        if x]
                runs[name].append({**ran, **summarise(rows, args.warmup, memory_key)})
        for name, rounds in runs.items():
            best = max(rounds, key=lambda x: x["pairs_per_s"])
            # Memory does not drift like speed: the largest of the rounds, as a bound.
            results["variants"][name] = {**best,
                                         "peak_mib": max(x["peak_mib"] for x in rounds),
                                         "rounds": rounds}
    except BaseException:
        print(f"bench_train: stopped; the run directories are kept in {work}", file=sys.stderr)
        raise
    results["wall_s"] = time.perf_counter() - t_all
    results["load_after"] = os.getloadavg()[0]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    add_flops(results, NUM_FRAMES)
    return results


def check_targets(r: dict, rtol: float) -> list[tuple[str, str, bool]]:
    """(target, measured, met): the issue's targets for the fast path (and, marked, for its CPU
    row layout), then the equality checks over every variant."""
    v = r["variants"]
    base = v["plain twin"]
    out = []
    for name in [n for n in ("fast path", "fast, unpacked") if n in v]:
        speed = v[name]["pairs_per_s"] / base["pairs_per_s"]
        mem = v[name]["peak_mib"] / base["peak_mib"]
        out += [(f"{name}: >= 2x the plain twin's pairs/s", f"{speed:.2f}x", speed >= 2.0),
                (f"{name}: <= 0.6x the plain twin's peak memory", f"{mem:.2f}x", mem <= 0.6)]

    def worst(key: str) -> float:
        return max(abs(x[key] - base[key]) / abs(base[key])
                   for runs in v.values() for x in runs["rounds"])

    # The same pairs everywhere: equal pairs per step, and equal real tokens per step within a
    # layout kind (a pair rejected in one run only would show here).
    tokens = {stamp(VARIANTS[n][0]): x["tokens"] for n, x in v.items()}
    same = all(x["pairs"] == base["pairs"] and x["tokens"] == tokens[stamp(VARIANTS[n][0])]
               for n, runs in v.items() for x in runs["rounds"])
    return out + [
        ("the same pairs and tokens per step in every variant", "equal" if same else "differ",
         same),
        (f"step-1 loss equal in every variant (rtol {rtol:g})",
         f"largest relative difference {worst('loss_1'):.1e}", worst("loss_1") <= rtol),
        (f"step-1 grad norm equal in every variant (rtol {rtol:g})",
         f"largest relative difference {worst('grad_norm_1'):.1e}", worst("grad_norm_1") <= rtol),
    ]


def print_report(r: dict, rtol: float, peak_tflops: float | None) -> None:
    s, v = r["shape"], r["variants"]
    base = v["plain twin"]
    ranks = ("GPU ranks (NCCL), bf16" if r["gpu"] else "CPU ranks (gloo, 1 thread each), fp32")
    print(f"machine: {r['machine']}; torch {r['torch']}; {r['world']} {ranks}, ZeRO-3; load "
          f"average {r['load_before']:.2f} before, {r['load_after']:.2f} after")
    print(f"model: LLaVA-NeXT-Video, {s['total_params'] / 1e6:.1f}M parameters; language model "
          f"{s['layers']} layers x {s['hidden']} (MLP {s['intermediate']}, "
          f"{s['lm_layer_params'] / 1e6:.2f}M in layers), vocab {s['vocab']} (embedding and LM "
          f"head {s['head_params'] / 1e6:.2f}M each); frozen vision tower + projector, "
          f"{s['tokens_per_frame']} tokens per frame")
    floor = r["import_baseline_mib"]
    print(f"run: {r['steps']} steps of {r['pairs_per_step']} pairs ({r['micro_batch_pairs']} per "
          f"rank per micro-step); pairs/s, tokens/s and step s over steps {r['warmup'] + 1}-"
          f"{r['steps']}, fastest of {r['rounds']} rounds"
          + ("" if r["gpu"] else f"; import baseline {floor:.0f} MiB RSS per process"))
    memory = f"peak {r['memory']} MiB/rank"
    print()
    print(f"| variant         | pairs/s | tokens/s | step s (best) | CPU share | {memory} | "
          "step-1 loss | step-1 grad norm | GFLOP/step | GFLOP/s | pairs/s ratio | memory ratio |")
    print(f"|-----------------|--------:|---------:|--------------:|----------:|{'-' * (len(memory) + 1)}:|"
          "------------:|-----------------:|-----------:|--------:|--------------:|-------------:|")
    for name, x in v.items():
        print(f"| {name:<15} | {x['pairs_per_s']:7.3f} | {x['tokens_per_s']:8.0f} | "
              f"{x['step_s']:5.2f} ({x['best_step_s']:5.2f}) | {100 * x['cpu_share']:8.0f}% | "
              f"{x['peak_mib']:{len(memory)}.0f} | {x['loss_1']:11.8f} | "
              f"{x['grad_norm_1']:16.8f} | {x['flops_per_step'] / 1e9:10.1f} | "
              f"{x['flops_per_s'] / 1e9:7.1f} | {x['pairs_per_s'] / base['pairs_per_s']:12.2f}x | "
              f"{x['peak_mib'] / base['peak_mib']:11.2f}x |")
    mfu = (f" With {peak_tflops:g} TFLOP/s peak: " + ", ".join(
        f"{n} {100 * x['flops_per_s'] / (peak_tflops * 1e12):.1f}%" for n, x in v.items())
        if peak_tflops else "")
    print(f"\nstep s: mean over the timed steps (the fastest). CPU share: the run's CPU time over "
          f"its wall time x cores, start-up included; one well below the others had to share the "
          f"cores with other work (on a GPU it reads low: the GPU does the work). GFLOP/step: "
          f"model FLOPs of one optimizer step, all ranks; "
          f"GFLOP/s: those over the step time. MFU = GFLOP/s / the machine's peak.{mfu}")
    print("pairs/s of each round: " + ", ".join(
        n + " " + " / ".join(f"{y['pairs_per_s']:.2f}" for y in x["rounds"]) for n, x in v.items()))
    last = max(abs(x["losses"][-1] - base["losses"][-1]) / abs(base["losses"][-1])
               for x in v.values())
    print(f"loss after step {r['steps']}: {base['losses'][-1]:.6f} in the plain twin, largest "
          f"relative difference over the variants {last:.1e}")
    if not r["gpu"]:
        print("memory ratio above the import baseline: " + ", ".join(
            f"{n} {(x['peak_mib'] - floor) / (base['peak_mib'] - floor):.2f}x"
            for n, x in v.items() if n != "plain twin"))
    print("\nprecompute-ref (one-off per data set, model and layout; start-up included):")
    for name in [n for n in ("+ precomputed", "fast path") if n in v]:
        layout = stamp(VARIANTS[name][0])
        live = "plain twin" if layout == "padded" else "+ shared-prefix"
        pre = r["precompute"][layout]
        if live not in v:
            continue
        saved = v[live]["step_s"] - v[name]["step_s"]
        payback = (f"paid back after {pre['wall_s'] / saved:.0f} steps "
                   f"({pre['wall_s'] / saved * r['pairs_per_step'] / max(pre['pairs'], 1):.1f} "
                   "epochs of the scored pairs)" if saved > 0 else "not paid back")
        print(f"  {layout}: {pre['pairs']} pairs in {pre['wall_s']:.0f} s ({pre['compute_s']:.0f} s "
              f"scoring); '{name}' saves {saved:.2f} s/step against '{live}': {payback}")
    print("\ntargets:")
    for what, value, ok in check_targets(r, rtol):
        print(f"  {'PASS' if ok else 'MISS'}  {what}: {value}")
    groups = len(r["precompute"]) + sum(len(x["rounds"]) for x in v.values())
    print(f"\ntotal wall time {r['wall_s']:.0f} s ({groups} process groups, start-up included)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true",
                   help="one rank per visible GPU, bf16, the GPU defaults (module docstring)")
    p.add_argument("--world", type=int, default=None,
                   help="ranks (default 2 on CPU, the visible GPUs with --gpu)")
    p.add_argument("--variants", default=None,
                   help="comma-separated names from the table (default: all on CPU; "
                        f"{', '.join(GPU_VARIANTS)} with --gpu); 'plain twin' is always run")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (4; GPU 6)")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of every variant, taking turns; each keeps its fastest (2; GPU 1)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of throughput")
    p.add_argument("--pairs-per-step", type=int, default=None, help="(8; GPU 16)")
    p.add_argument("--micro-batch-pairs", type=int, default=None,
                   help="pairs per rank per forward (4; GPU 8)")
    p.add_argument("--hidden", type=int, default=None, help="language model width (256; GPU 2048)")
    p.add_argument("--layers", type=int, default=None, help="language model layers (6; GPU 8)")
    p.add_argument("--frame-tokens", type=int, default=144,
                   help="video tokens per frame, a square (4: the demo model; 144: the 7B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=None,
                   help="step-1 loss and grad norm (1e-5 for fp32; GPU, bf16: 2e-2)")
    p.add_argument("--assets", default=str(REPO / ".safevid" / "demo"), help="demo assets")
    p.add_argument("--model-cache", default=str(REPO / ".safevid" / "bench_train"),
                   help="where the bench model is built, once per shape")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the machine's peak FLOP/s, to print the MFU")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    gpu = args.gpu
    defaults = dict(steps=(4, 6), rounds=(2, 1), pairs_per_step=(8, 16), micro_batch_pairs=(4, 8),
                    hidden=(256, 2048), layers=(6, 8), rtol=(1e-5, 2e-2),
                    peak_tflops=(None, GPU_PEAK_TFLOPS))
    for key, (cpu_value, gpu_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    if gpu:
        import torch

        # Never the CPU instead: a GPU benchmark that ran on the CPU would report nonsense.
        if not torch.cuda.is_available():
            p.error("--gpu: torch sees no CUDA device (torch.cuda.is_available() is False)")
        args.world = args.world or torch.cuda.device_count()
        if args.world > torch.cuda.device_count():
            p.error(f"--world {args.world}: only {torch.cuda.device_count()} GPUs are visible")
    args.world = args.world or 2
    names = ([n.strip() for n in args.variants.split(",")] if args.variants
             else GPU_VARIANTS if gpu else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    args.variants = ["plain twin", *[n for n in VARIANTS if n in names and n != "plain twin"]]
    if not any(stamp(VARIANTS[n][0]) == "shared-prefix" for n in args.variants):
        p.error("--variants: name at least one shared-prefix variant (the FLOPs estimate reads "
                "the prompt tokens off the difference of the two layouts)")
    if args.pairs_per_step % (args.world * args.micro_batch_pairs):
        p.error(f"--pairs-per-step {args.pairs_per_step} is not a multiple of --world "
                f"{args.world} x --micro-batch-pairs {args.micro_batch_pairs}")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if math.isqrt(args.frame_tokens) ** 2 != args.frame_tokens:
        p.error("--frame-tokens must be a square (the pooled patches of a square frame)")
    results = run(args)
    print_report(results, args.rtol, args.peak_tflops)
    if args.keep:
        print(f"run directories kept in {results['work']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    # The speed and memory targets are reported; a broken equality is an error.
    return 0 if all(ok for _, _, ok in check_targets(results, args.rtol)[-3:]) else 1


if __name__ == "__main__":
    sys.exit(main())
