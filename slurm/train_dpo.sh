#!/usr/bin/env bash
# DPO training: `bash slurm/train_dpo.sh [CONFIG] [key=value ...]` on this machine, or
# `sbatch slurm/train_dpo.sh CONFIG ...` on a cluster. CONFIG defaults to configs/demo.yaml.
# Outside Slurm: all local GPUs, or NPROC_PER_NODE CPU processes (default 2).
#SBATCH --job-name=safevid-dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi

config=configs/demo.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi

if [ "${SLURM_NNODES:-1}" -gt 1 ]; then
  echo "train_dpo.sh: multi-node jobs (SLURM_NNODES=$SLURM_NNODES) are not supported yet; use -N 1" >&2
  exit 2
fi
exec "$py" -m safevid.launcher "$config" "$@"
