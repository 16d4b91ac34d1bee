#!/usr/bin/env bash
# Start `megaflow train` on every node of a SLURM allocation: one torchrun per node (srun), which
# starts one worker per GPU; the workers meet at a c10d rendezvous on the first node.
#
#   launchers/slurm_train.sh [--set a.b=v ...]     (inside an allocation; launchers/slurm.sbatch calls it)
#   DRY_RUN=1 launchers/slurm_train.sh ...         print the exports and the srun line, run nothing
#
# Environment (all optional except inside an allocation's SLURM_* variables):
#   CONFIG          run config (default configs/default.yaml)
#   GPUS_PER_NODE   workers per node (default SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 8)
#   MASTER_ADDR     rendezvous host (default the allocation's first node: scontrol show hostnames)
#   MASTER_PORT     rendezvous port (default 20000 + SLURM_JOB_ID % 20000: two jobs sharing a node differ)
#   LOG_DIR         per-rank stdout/stderr files, under LOG_DIR/<job id>/ (default logs)
#   TORCHRUN        the torchrun to call (default .venv/bin/torchrun if present, else torchrun)
#   NCCL_NVLS_ENABLE, NCCL_DEBUG, TORCH_NCCL_ASYNC_ERROR_HANDLING, OMP_NUM_THREADS, DS_ACCELERATOR:
#                   exported with the defaults below unless already set
#
# `--resume` is always passed: megaflow picks the newest COMPLETE checkpoint in train.out_dir (an
# interrupted save is never picked), so a requeued or resubmitted job continues where the last
# checkpoint left it, and a first run starts from scratch. On SIGUSR1 (slurm.sbatch asks for it
# before the time limit) the job requeues itself; it loses the steps since the last checkpoint,
# so keep train.save_every well below the steps one time limit allows (or set train.max_minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${SLURM_JOB_ID:?not inside a SLURM allocation (SLURM_JOB_ID unset); submit launchers/slurm.sbatch with sbatch}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}"
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES unset}}
CONFIG=${CONFIG:-configs/default.yaml}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
  GPUS_PER_NODE=${GPUS_PER_NODE:-0}
  [ "$GPUS_PER_NODE" -gt 0 ] 2>/dev/null || GPUS_PER_NODE=8
fi
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
LOG_DIR=${LOG_DIR:-logs}
if [ -z "${TORCHRUN:-}" ]; then
  if [ -x .venv/bin/torchrun ]; then TORCHRUN="$PWD/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
fi
[ -f "$CONFIG" ] || { echo "slurm_train.sh: CONFIG=$CONFIG does not exist (run from the repo root, or set CONFIG)" >&2; exit 2; }

# Knobs: each keeps a value already in the environment.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}          # NVLink SHARP multicast off (hangs on some fabrics)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job, no hang
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE} / GPUS_PER_NODE > 0 ? ${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE} / GPUS_PER_NODE : 1 ))}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MASTER_ADDR MASTER_PORT
# SLURM >= 22.05: a step does not inherit the job's --cpus-per-task unless told; torchrun's workers need the cores.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
# Multi-NIC clusters usually also need NCCL_SOCKET_IFNAME / NCCL_IB_HCA: set them in the environment.

CMD=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
     "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"
     --max_restarts 0 --log_dir "$LOG_DIR/$SLURM_JOB_ID" --tee 3 --local_ranks_filter 0
     -m megaflow.cli train --config "$CONFIG" --resume "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  for v in MASTER_ADDR MASTER_PORT NCCL_NVLS_ENABLE NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS DS_ACCELERATOR; do
    echo "export $v=${!v}"
  done
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES nodes x $GPUS_PER_NODE GPUs," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, per-rank logs in $LOG_DIR/$SLURM_JOB_ID/"
mkdir -p "$LOG_DIR/$SLURM_JOB_ID"
requeue() {
  echo "[$(date -u +%FT%TZ)] SIGUSR1 (time limit near): requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1
# In the background and waited for, so the trap runs at once instead of after srun returns.
"${CMD[@]}" &
pid=$!
rc=0
wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do  # wait was interrupted by the signal; srun is still running
  wait "$pid" || rc=$?
done
exit "$rc"
