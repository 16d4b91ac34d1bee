#!/usr/bin/env bash
# `megaflow train` on SLURM: one task per GPU, srun starts them, megaflow reads SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID (parallel/runtime.py). The world size must be a multiple of
# parallel.tp * parallel.pp; what is left is data parallelism. Example:
#   sbatch --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 launchers/slurm_train.sh \
#          --config configs/h200_1b.yaml --set parallel.tp=8 --set parallel.zero_stage=1
# The run directory (train.out_dir) must be on a filesystem every node sees (checkpoints are
# written by all ranks into one directory). Resume: add --resume.
#SBATCH --job-name=megaflow
#SBATCH --exclusive
set -euo pipefail
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
srun --kill-on-bad-exit=1 python -m megaflow.cli train "$@"
