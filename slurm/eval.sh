#!/usr/bin/env bash
# Benchmark evaluation: `sbatch slurm/eval.sh --model RUN_DIR/hf --bench FILE --out DIR
# [--judge-base-url URL --judge-model NAME] ...` on a cluster, or the same with `bash` on this
# machine. Every argument goes to `safevid eval` (see docs/evaluation.md). Generation runs one
# process per visible GPU through the training launcher (the answers are the same for any
# number); off a GPU, NPROC_PER_NODE processes (default 1 here). Resumable: submit the
# same command again after a time limit or a preemption and it continues where it stopped.
# The judge's key comes from OPENAI_API_KEY in the submitting environment (sbatch exports it).
#
# Edit these defaults for your cluster (command-line sbatch options override them):
#SBATCH --job-name=safevid-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --error=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
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

if [ $# -eq 0 ]; then
  echo "usage: [sbatch|bash] slurm/eval.sh --model DIR --bench FILE --out DIR [safevid eval options]" >&2
  exit 2
fi
if [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "eval.sh: job ${SLURM_JOB_ID} on ${SLURMD_NODENAME:-?}, restart ${SLURM_RESTART_COUNT:-0}: $*" >&2
fi
# Off a cluster and without a GPU, one CPU process; under Slurm a job without a visible GPU is
# refused by the launcher (set NPROC_PER_NODE to run CPU processes on purpose).
if [ -z "${NPROC_PER_NODE:-}" ] && [ -z "${SLURM_JOB_ID:-}" ] \
   && [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" = 0 ]; then
  export NPROC_PER_NODE=1
fi
exec "$py" -m safevid.launcher --command eval "$@"
