#!/usr/bin/env bash
# Shard preparation on a Slurm job array:
#   sbatch --array=0-31 slurm/prepare_shards.sh --videos /data/videos --pairs /data/pairs.jsonl \
#          --out /data/safevid --frames 16 --size 336 [--keep-aspect] [--fps 2]
# Each array task writes the shards i with i % 32 == its index (its place in the array, of
# the array's task count), decoding with --workers processes (default: the task's CPUs). The
# first task submits the merge, which runs once every task has succeeded
# (--dependency=afterok) and writes index.json and rejects.jsonl. A failed or preempted task is
# simply run again alone (`sbatch --array=7 ...`, the same task id as before): it does the same
# shards as before, skipping those it had finished, and queues the merge again.
# Without Slurm, `bash slurm/prepare_shards.sh --videos ... --out ...` is one job, merged at the end.
#
#SBATCH --job-name=safevid-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

# Paths on the command line mean what they say from where the command is run (outside Slurm
# the script stays in the working directory; sbatch starts it in the submit directory); config
# names such as configs/demo.yaml are also found in the repository. The repository: this
# script's own (under sbatch it runs from a copy), $SAFEVID_HOME, or the submit directory.
py=${PYTHON:-}
for repo in "$(cd "$(dirname "$0")/.." && pwd)" "${SAFEVID_HOME:-}" "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
  if [ -n "$repo" ] && [ -f "$repo/slurm/python.sh" ]; then . "$repo/slurm/python.sh"; break; fi
done
: "${py:?cannot find the SafeVid repository: set SAFEVID_HOME=/path/to/SafeVid or PYTHON}"

workers=()
if [[ " $* " != *" --workers "* ]]; then workers=(--workers "${SLURM_CPUS_PER_TASK:-2}"); fi
"$py" -m safevid prepare "${workers[@]}" "$@"

# The first task of an array queues the merge behind the whole array; its log goes beside
# the shards.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [[ " $* " != *" --merge "* ]] \
    && [ "${SLURM_ARRAY_TASK_ID:-}" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
  out=.
  args=("$@")
  for ((i = 0; i < ${#args[@]} - 1; i++)); do
    if [ "${args[i]}" = --out ]; then out=${args[i + 1]}; fi
  done
  sbatch --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --job-name=safevid-prepare-merge \
    --cpus-per-task=1 --output="$out/slurm-prepare-merge-%j.out" "$0" --merge "$@"
fi
