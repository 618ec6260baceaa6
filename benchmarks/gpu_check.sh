#!/usr/bin/env bash
# The GPU check: one prepared script for a single H100/H200 machine that has PyTorch, Triton
# and transformers but no network. Within 8 minutes it
#   1. installs the missing packages from the wheels in .whl/ beside the checkout
#      (made by benchmarks/gpu_wheels.sh; already-present versions are skipped);
#   2. prints the device and the package versions, and fails unless DeepSpeed picks CUDA;
#   3. runs tests/test_kernels.py, its CUDA tests included (Triton compiled, bf16 and fp32);
#   4. runs the log-prob benchmark at N=16384, H=4096, V=152064 in bf16 (Triton vs naive),
#      and, when named in --steps, the trainer benchmark (benchmarks/bench_train.py --gpu: the
#      plain twin against the fast path, bf16, MFU; about 4 minutes, which the 8-minute budget
#      of the other steps has no room for);
#   5. trains 20 ZeRO-3 bf16 DPO steps of configs/demo.yaml on one GPU;
#   6. builds a random LLaVA-NeXT-Video from the 7B config with fewer text layers
#      (--layers, default 14) and trains 20 DPO steps (--llava-steps) of it on the demo shards: ZeRO-3, bf16,
#      gradient checkpointing, frozen vision tower, a frozen reference;
#   7. the row layouts on the GPU (FlexAttention): benchmarks/bench_layouts.py --gpu, the demo
#      again with packed rows instead of shared-prefix ones (the summary compares both runs'
#      losses and gradient norms), and the Qwen2-VL demo config;
# and prints a summary table with tokens/s and peak GPU memory of both runs. Every step has its
# own time limit inside a total budget, a failed step does not stop the later ones, and the
# exit status is non-zero when any step failed.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run        # the same steps on CPU, tiny sizes, fp32
#
# Options: --layers N (text layers of the 7B-shaped model; 32 is the full 7B), --assets DIR (demo assets, built
# there when missing), --work DIR (scratch; default a new folder under /tmp), --budget S (total
# seconds), --steps a,b,... (run only these steps: install device kernels bench train_bench
# demo_dpo llava7b layouts; default all but train_bench), --wheels DIR (default .whl),
# --llava-steps N (default 20). With OUT set, the log, summary.json and the runs' metrics are
# copied to $OUT.
#
# Peak memory is torch.cuda.max_memory_allocated() read in the training process once the run
# has ended (benchmarks/gpu_check.py train); on CPU it is the process's peak resident set.
#
# Why 14 layers: 3.42B parameters, 3.10B of them trainable. ZeRO-3 on one GPU keeps 16 bytes
# per trainable parameter (bf16 weight and gradient, fp32 master, two Adam moments), 2 per
# frozen one and 2 per parameter of the reference: 53.1 GiB, plus one optimizer sub-group's
# fp32 gradients (3.7 GiB), the gathered weights in flight (1.9 GiB) and about 5 GiB of
# activations and slack, 64 GiB of an 80 GB card. 16 layers come to an estimated 70.5 GiB,
# too close to the card's 79 GiB for a run whose estimate has not been measured yet.
# gpu_check.py prints the estimate beside the measured peak.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
LAYERS=14
ASSETS=""
WORK=""
BUDGET=""
STEPS=all
WHEELS=.whl
LLAVA_STEPS=20
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --layers) LAYERS=$2; shift ;;
    --assets) ASSETS=$2; shift ;;
    --work) WORK=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --steps) STEPS=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --llava-steps) LLAVA_STEPS=$2; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
ASSETS=${ASSETS:-$WORK/demo}
mkdir -p "$WORK/logs" "$WORK/results"
: > "$WORK/steps.tsv"
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$WORK/gpu_check.log}
mkdir -p "$(dirname "$LOG")"
: > "$LOG"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi

# Nothing may reach for the network (there is none on the GPU machine: a hub lookup would only
# wait for its timeout), and DeepSpeed must not compile ops: the trainer's optimizer is a client
# torch AdamW, so none is needed.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_HUB_DISABLE_TELEMETRY=1 DS_BUILD_OPS=0
unset RANK LOCAL_RANK WORLD_SIZE MASTER_ADDR MASTER_PORT
if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  BUDGET=${BUDGET:-300}
else
  # A cpu accelerator left over from CPU work would silently train on the CPU.
  [ "${DS_ACCELERATOR:-}" = cpu ] && unset DS_ACCELERATOR
  BUDGET=${BUDGET:-460}
fi
DEADLINE=$((SECONDS + BUDGET))

say() { echo "$*" | tee -a "$LOG"; }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout` (its whole process group,
# benchmark children included) for CAP seconds or what is left of the budget, whichever is
# less; logs its output and records its status for the summary.
FAILED=0
run_step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - SECONDS)) start=$SECONDS rc status
  local limit=$((cap < left ? cap : left))
  say ""
  say "==== $name (limit ${limit}s, $(date -u +%H:%M:%S)) ===="
  if [ "$limit" -lt 10 ]; then
    say "skipped: the budget of ${BUDGET}s is spent"
    printf '%s\t%s\t%s\n' "$name" "no time" 0 >> "$WORK/steps.tsv"
    FAILED=1
    return 1
  fi
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="timeout ${limit}s" ;;
    *) status="failed rc=$rc" ;;
  esac
  say "---- $name: $status in $((SECONDS - start))s"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$WORK/steps.tsv"
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}
# wanted NAME: whether --steps selects this step.
wanted() { [ "$STEPS" = all ] || [[ ",$STEPS," == *",$1,"* ]]; }
skip_step() {
  say "==== $1: skipped ($2)"
  printf '%s\t%s\t%s\n' "$1" skipped 0 >> "$WORK/steps.tsv"
}

say "gpu check in $REPO, $(git rev-parse --short HEAD 2>/dev/null || echo '?'), work $WORK," \
    "dry run $DRY, budget ${BUDGET}s, python $PY"

# ---- 1. packages -------------------------------------------------------------------------
LINKS=()
trap '[ ${#LINKS[@]} -eq 0 ] || rm -f "${LINKS[@]}"' EXIT
if [ "$DRY" = 1 ]; then
  skip_step install "dry run: this environment has everything"
else
  SITE=/tmp/gpu_check_site
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  if [ -d "$WHEELS" ]; then
    run_step install 120 "$PY" benchmarks/gpu_check.py install --wheels "$WHEELS" --site "$SITE"
  else
    skip_step install "no $WHEELS/ folder: run benchmarks/gpu_wheels.sh where there is network"
  fi
  # setup.py installs kernels/, launcher/ and data_prep/ as safevid.kernels etc. Without pip
  # install, link them into the package for this run (removed again on exit).
  if ! "$PY" -c "import safevid.kernels, safevid.launcher, safevid.data_prep" 2>/dev/null; then
    for d in kernels launcher data_prep; do
      if [ ! -e "safevid/$d" ]; then ln -s "../$d" "safevid/$d" && LINKS+=("safevid/$d"); fi
    done
  fi
fi

# ---- 2. device ---------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  run_step device 60 "$PY" benchmarks/gpu_check.py info --result "$WORK/results/device.json"
else
  # Disk and memory too: the 7B-shaped model is written to /tmp and read back twice.
  run_step device 60 bash -c 'nvidia-smi; free -g; df -h /tmp;
    exec "$0" benchmarks/gpu_check.py info --require-cuda --result "$1"' "$PY" "$WORK/results/device.json"
fi

# ---- 3. kernel tests ---------------------------------------------------------------------
if ! wanted kernels; then
  skip_step kernels "not in --steps"
elif [ "$DRY" = 1 ]; then
  # The CPU forms of these tests run in `make test`; on CPU the CUDA ones only skip.
  skip_step kernels "dry run: make test runs tests/test_kernels.py on the CPU"
else
  # Not the Triton-interpreter test: it checks on CPU what this step checks compiled, and the
  # GPU image's Triton 3.6 interpreter fails under its numpy 2.5 before any kernel arithmetic
  # (`int()` of a 1-element array). CI runs it.
  run_step kernels 150 env SAFEVID_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py -k "not under_interpreter"
fi

# ---- 4. log-prob benchmark ---------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  BENCH=(--cases 512x64x1000 --rounds 1)
else
  BENCH=(--gpu --rounds 2)  # 16384x4096x152064, bf16, CUDA, Triton vs naive torch
fi
if wanted bench; then
  run_step bench 150 "$PY" benchmarks/bench_logprobs.py "${BENCH[@]}" --json "$WORK/results/bench.json"
else
  skip_step bench "not in --steps"
fi
# The trainer end to end on the GPU: the plain twin against the fast path (each switch alone
# would triple the minutes; `bench_train.py --gpu` runs them). Its CPU form runs in `make
# bench`; at toy sizes it would add minutes to the dry run and test nothing that run does not.
if [ "$DRY" = 1 ]; then
  skip_step train_bench "dry run: make bench runs it on the CPU"
elif [[ ",$STEPS," == *",train_bench,"* ]]; then  # only when named
  run_step train_bench 300 "$PY" benchmarks/bench_train.py --gpu --variants "fast path" --assets "$ASSETS" \
    --model-cache "$WORK/bench_train_models" --json "$WORK/results/train_bench.json"
else
  skip_step train_bench "not named in --steps"
fi

# ---- 5. demo DPO: configs/demo.yaml, ZeRO-3, one process -------------------------------
if [ "$DRY" = 1 ]; then
  DEMO=(train.max_steps=2 train.save_every=0 data.eval_max_pairs=8 train.export_hf=false)
else
  DEMO=(train.max_steps=20)
fi
if wanted demo_dpo; then
  run_step demo_dpo 150 "$PY" benchmarks/gpu_check.py train --result "$WORK/results/demo_dpo.json" \
    -- configs/demo.yaml "output_dir=$WORK/demo_run" "demo.assets_dir=$ASSETS" "${DEMO[@]}"
else
  skip_step demo_dpo "not in --steps"
fi

# ---- 6. LLaVA-NeXT-Video 7B config, fewer text layers -------------------------------------
if [ "$DRY" = 1 ]; then
  SMALL=(--small)
  LAYERS=1
  L7B=(train.max_steps=2 train.pairs_per_step=4 train.micro_batch_pairs=2)
else
  SMALL=()
  L7B=("train.max_steps=$LLAVA_STEPS")
fi
if ! wanted llava7b; then
  skip_step llava7b_build "not in --steps"
elif run_step llava7b_build 150 "$PY" benchmarks/gpu_check.py build-7b --out "$WORK/llava7b" \
    --assets "$ASSETS" --layers "$LAYERS" "${SMALL[@]}" --result "$WORK/results/llava7b_build.json"; then
  # The production ZeRO-3 settings (buckets and persistence sized for 7B), gradient
  # checkpointing as in configs/llava_next_video_7b.yaml, a short final evaluation, no export.
  # Expandable segments: a model this close to the card's size must not lose gigabytes to
  # allocator fragmentation.
  run_step llava7b_dpo 360 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$PY" \
    benchmarks/gpu_check.py train --no-checkpoint --result "$WORK/results/llava7b_dpo.json" \
    -- configs/demo.yaml "output_dir=$WORK/llava7b_run" "demo.assets_dir=$ASSETS" \
    "model.name_or_path=$WORK/llava7b" train.deepspeed_config=ds_configs/zero3.json \
    train.gradient_checkpointing=true train.save_every=0 train.eval_every=0 \
    data.eval_max_pairs=8 train.export_hf=false "${L7B[@]}"
else
  skip_step llava7b_dpo "the model was not built"
  FAILED=1
fi

# ---- 7. row layouts on the GPU ------------------------------------------------------------
if wanted layouts; then
  if [ "$DRY" = 1 ]; then
    LB=(--hidden 64 --layers 1 --rounds 1 --pairs 4)
  else
    LB=(--gpu)
  fi
  run_step layouts_bench 360 "$PY" benchmarks/bench_layouts.py "${LB[@]}" --assets "$ASSETS" \
    --json "$WORK/results/layouts.json"
  run_step demo_packed 150 "$PY" benchmarks/gpu_check.py train --result "$WORK/results/demo_packed.json" \
    -- configs/demo.yaml "output_dir=$WORK/demo_packed_run" "demo.assets_dir=$ASSETS" \
    "${DEMO[@]}" data.shared_prefix=false
  run_step qwen_demo 150 "$PY" benchmarks/gpu_check.py train --result "$WORK/results/qwen_demo.json" \
    -- configs/demo_qwen2_vl.yaml "output_dir=$WORK/qwen_demo_run" "demo.assets_dir=$ASSETS" \
    "${DEMO[@]}"
else
  skip_step layouts "not in --steps"
fi

# ---- summary -----------------------------------------------------------------------------
SUMMARY=${OUT:+$OUT/summary.json}
SUMMARY=${SUMMARY:-$WORK/summary.json}
"$PY" benchmarks/gpu_check.py summary --work "$WORK" --json "$SUMMARY" | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || FAILED=1
if [ -n "${OUT:-}" ]; then
  for run in demo_run llava7b_run demo_packed_run qwen_demo_run; do
    [ -f "$WORK/$run/metrics.jsonl" ] && cp "$WORK/$run/metrics.jsonl" "$OUT/${run%_run}_metrics.jsonl"
  done
  [ -f "$WORK/results/layouts.json" ] && cp "$WORK/results/layouts.json" "$OUT/layouts.json"
  [ -f "$WORK/results/train_bench.json" ] && cp "$WORK/results/train_bench.json" "$OUT/train_bench.json"
fi
say "gpu check finished in ${SECONDS}s; log $LOG, summary $SUMMARY"
exit "$FAILED"
