#!/usr/bin/env bash
# DPO training: `sbatch [-N NODES] slurm/train_dpo.sh CONFIG [key=value ...]` on a cluster, or
# `bash slurm/train_dpo.sh [CONFIG] [key=value ...]` on this machine (CONFIG defaults to
# configs/demo.yaml; all local GPUs, or NPROC_PER_NODE CPU processes, default 2).
# SAFEVID_COMMAND=precompute-ref runs `safevid precompute-ref` the same way (the reference
# log-probs for train.reference=precomputed) instead of training.
#
# Edit these defaults for your cluster (command-line sbatch options override them):
#SBATCH --job-name=safevid-dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --error=slurm-%x-%j.out
#SBATCH --open-mode=append
# Preemption and the time limit: Slurm sends SIGUSR1 to this script 5 minutes before the end;
# every rank then checkpoints after its current step, and the job requeues itself and resumes
# from that checkpoint. Give the signal enough lead time for one step plus a checkpoint write.
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#
# One launcher per node (srun, one task per node) starts one rank per GPU; ranks rendezvous on
# the first host of the allocation, port derived from the job id (MASTER_ADDR / MASTER_PORT
# override both). Under Slurm a node without a visible GPU is refused unless NPROC_PER_NODE is
# set (CPU processes on purpose).
#
# NCCL settings some clusters need (uncomment and adapt):
# export NCCL_SOCKET_IFNAME=ib0          # the interface between nodes
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_DEBUG=WARN                 # INFO when debugging a hang
# export NCCL_NVLS_ENABLE=0              # if NVLink SHARP initialisation fails
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

config=configs/demo.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi

# A crash prints every thread's stack, which is what tells a hang in a collective apart.
export PYTHONFAULTHANDLER=1

if [ -z "${SLURM_JOB_ID:-}" ]; then
  exec "$py" -m safevid.launcher --command "${SAFEVID_COMMAND:-train}" "$config" "$@"
fi

echo "train_dpo.sh: job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-}," \
     "restart ${SLURM_RESTART_COUNT:-0}, config $config $*" >&2
srun_args=(--nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun does not inherit --cpus-per-task from the batch allocation (Slurm >= 22.05).
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi

# srun runs in the background so that this shell can pass Slurm's warning signal on to it (srun
# forwards it to every node's launcher, which forwards it to the ranks).
srun "${srun_args[@]}" "$py" -m safevid.launcher --command "${SAFEVID_COMMAND:-train}" "$config" "$@" &
launcher=$!
forward() {
  echo "train_dpo.sh: stop requested: the ranks checkpoint and stop after their current step" >&2
  kill -s "$1" "$launcher" 2>/dev/null || true
}
trap 'forward USR1' USR1
# srun answers SIGTERM by killing its tasks at once; Slurm sends the tasks SIGTERM itself anyway,
# so the shell passes on only the request to stop.
trap 'forward USR1' TERM
# `wait` also returns when a trapped signal arrives: wait again until the launcher has ended,
# then once more for its own exit status (bash keeps it).
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher" || true; done
wait "$launcher" && rc=0 || rc=$?
exit "$rc"
