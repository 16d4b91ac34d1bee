#!/usr/bin/env bash
# `megaflow train` on N processes of this machine, through torchrun's standalone rendezvous.
#
#   launchers/local.sh N [megaflow train arguments]
#   launchers/local.sh 8 --config configs/h200_1b.yaml --set parallel.tp=2
#   launchers/local.sh 2 --config configs/tiny.yaml --set train.device=cpu     # no GPU: gloo on CPU
#   DRY_RUN=1 launchers/local.sh 4 --config X.yaml                           # print, run nothing
#
# With GPUs, N workers share them one each (N <= the GPU count). Without a GPU (nvidia-smi lists
# none), the workers run on the CPU (megaflow picks gloo there), DS_ACCELERATOR=cpu, and each gets
# cores / N threads (OMP_NUM_THREADS) so they do not oversubscribe. Knobs kept from the environment:
# TORCHRUN (default .venv/bin/torchrun if present), OMP_NUM_THREADS, NCCL_NVLS_ENABLE (0),
# DS_ACCELERATOR. Logs go to the console; per-rank files too with LOG_DIR=dir.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: launchers/local.sh N [megaflow train arguments]  (N: number of processes, >= 1)" >&2; exit 2; }
[ $# -ge 1 ] || usage
N=$1; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N=$N is not a positive integer" >&2; usage; }

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPUS=${GPUS:-0}
if [ "$GPUS" -gt 0 ]; then
  if [ "$N" -gt "$GPUS" ]; then
    echo "local.sh: $N processes but this machine has $GPUS GPUs; use N <= $GPUS" >&2; exit 2
  fi
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${TORCHRUN:-}" ]; then
  if [ -x .venv/bin/torchrun ]; then TORCHRUN="$PWD/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
fi
CMD=("$TORCHRUN" --standalone --nnodes 1 --nproc_per_node "$N")
[ -n "${LOG_DIR:-}" ] && CMD+=(--log_dir "$LOG_DIR" --tee 3)
CMD+=(-m megaflow.cli train "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "export DS_ACCELERATOR=$DS_ACCELERATOR OMP_NUM_THREADS=$OMP_NUM_THREADS  # $GPUS GPUs"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
