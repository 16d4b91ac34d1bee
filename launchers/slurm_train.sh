#!/usr/bin/env bash
# Start `megaflow train` on every node of a SLURM allocation and keep the job alive across signals
# and crashes: one torchrun per node (srun), which starts NPROC_PER_NODE workers (one per GPU, or
# CPU workers on gloo when the nodes have no GPU); the workers meet at MASTER_ADDR:MASTER_PORT on the
# first node. launchers/slurm.sbatch calls it as the batch shell.
#
#   launchers/slurm_train.sh [--set a.b=v ...]     (inside an allocation)
#   DRY_RUN=1 launchers/slurm_train.sh ...         print the exports and the srun line, run nothing
#
# Environment (all optional except the allocation's SLURM_* variables):
#   CONFIG            run config (default configs/default.yaml)
#   GPUS_PER_NODE     GPUs per node (default SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE, else the GPUs
#                     nvidia-smi lists, else 0: the CPU path, DS_ACCELERATOR=cpu)
#   NPROC_PER_NODE    workers per node (default GPUS_PER_NODE; 1 on CPU nodes)
#   MASTER_ADDR       rendezvous host (default the NodeAddr of the allocation's first node)
#   MASTER_PORT       rendezvous port (default 20000 + SLURM_JOB_ID % 20000: two jobs sharing a node differ)
#   LOG_DIR           logs/ of the repository by default; per job LOG_DIR/<job id>/ holds
#                     <node>.rank<R>.log (every rank's output, appended across restarts; rank 0's
#                     also goes to the job log) and <node>.rank<R>.exit (its last exit code)
#   TORCHRUN, PYTHON  default the repository's .venv/bin/ ones when present, else from PATH
#   SIGNAL_LEAD       seconds the job's --signal=B:USR1@N comes before its time limit (default 300,
#                     as in slurm.sbatch; 0 without --signal); with MIN_WORK_S (default 300) the job
#                     refuses a --time under SIGNAL_LEAD + MIN_WORK_S (it would requeue forever)
#   FAILURE_REQUEUES  crashes (a rank killed, a timeout, OOM) after which the job requeues itself
#                     (default 2; 0 = never); a run error (exit 2: config, checkpoint, no progress) never
#   NCCL_NVLS_ENABLE, NCCL_DEBUG, TORCH_NCCL_ASYNC_ERROR_HANDLING, OMP_NUM_THREADS, DS_ACCELERATOR:
#                     exported with the defaults below unless already set
#
# Signals: SIGUSR1 (before the time limit) is passed to every worker; they agree at the next step
# boundary, save a checkpoint and exit 0, then this script requeues the job, which resumes
# (--resume) from that checkpoint. SIGTERM (preemption, `scontrol requeue`, time limit, scancel)
# reaches the workers from SLURM directly: they save the same way within SLURM's KillWait, and
# SLURM requeues or ends the job. torchrun ignores SIGUSR1 here (it would die of it) and forwards
# SIGTERM. A hung or dead rank makes the others fail after parallel.timeout_s (the collective
# timeout), and --kill-on-bad-exit ends the rest of the step.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

: "${SLURM_JOB_ID:?not inside a SLURM allocation (SLURM_JOB_ID unset); submit launchers/slurm.sbatch with sbatch}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}"
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES unset}}
CONFIG=${CONFIG:-configs/default.yaml}
[ -f "$CONFIG" ] || { echo "slurm_train.sh: CONFIG=$CONFIG does not exist (relative to $REPO or the submit directory); set CONFIG" >&2; exit 2; }
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  [ -n "$GPUS_PER_NODE" ] || GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # --gpus-per-node=h200:8 -> 8
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || { echo "slurm_train.sh: GPUS_PER_NODE=$GPUS_PER_NODE is not a number" >&2; exit 2; }
if [ "$GPUS_PER_NODE" -gt 0 ]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || { echo "slurm_train.sh: NPROC_PER_NODE=$NPROC_PER_NODE must be >= 1" >&2; exit 2; }
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
if [ -z "${MASTER_ADDR:-}" ]; then  # the address SLURM itself reaches the node at (a node name may not resolve)
  MASTER_ADDR=$(scontrol show node "$HEAD" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1 || true)
  MASTER_ADDR=${MASTER_ADDR:-$HEAD}
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
LOG_DIR=$(realpath -m "${LOG_DIR:-logs}")
RUN_DIR=$LOG_DIR/$SLURM_JOB_ID
if [ -z "${TORCHRUN:-}" ]; then
  if [ -x .venv/bin/torchrun ]; then TORCHRUN="$REPO/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE}}

# Knobs: each keeps a value already in the environment.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}          # NVLink SHARP multicast off (hangs on some fabrics)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job, no hang
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))}
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" MASTER_ADDR MASTER_PORT PYTHON
export MEGAFLOW_RUN_DIR=$RUN_DIR
# SLURM >= 22.05: a step does not inherit the job's --cpus-per-task unless told; torchrun's workers need the cores.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
# Multi-NIC clusters usually also need NCCL_SOCKET_IFNAME / NCCL_IB_HCA: set them in the environment.

# One torchrun per node, node rank = SLURM_NODEID (PET_NODE_RANK is torchrun's --node_rank): static
# rendezvous, global ranks in node order, the store in node 0's torchrun. The agent ignores SIGUSR1
# (bash's trap '' survives the exec; torchrun would die of it); the workers install their own handler.
CMD=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL
     bash -c 'trap "" USR1; export PET_NODE_RANK=$SLURM_NODEID; exec "$@"' megaflow-node
     "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend static --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --max_restarts 0 --no-python "$REPO/launchers/slurm_rank.sh"
     train --config "$CONFIG" --resume "$@")

time_limit_s() {  # the job's --time in seconds, or nothing (UNLIMITED, unknown)
  local t d=0 h=0 m=0 s=0
  t=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null || true)
  [[ "$t" =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 0
  d=${BASH_REMATCH[2]:-0} h=${BASH_REMATCH[4]:-0} m=${BASH_REMATCH[5]} s=${BASH_REMATCH[6]}
  echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}
limit=$(time_limit_s)
lead=${SIGNAL_LEAD:-300} min_work=${MIN_WORK_S:-300}
if [ -n "$limit" ] && [ "$lead" -gt 0 ] && [ "$limit" -lt $(( lead + min_work )) ]; then
  echo "slurm_train.sh: job $SLURM_JOB_ID has --time=$(( limit / 60 ))min, but SIGUSR1 comes ${lead} s before the limit" \
       "and a run needs ${min_work} s beyond that (start-up, steps, a save): every start would be signalled at once and" \
       "requeued forever. Submit with --time >= $(( (lead + min_work + 59) / 60 )) (minutes), or a smaller" \
       "--signal=B:USR1@N with SIGNAL_LEAD=N (MIN_WORK_S lowers the margin)" >&2
  exit 2
fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  for v in MASTER_ADDR MASTER_PORT NCCL_NVLS_ENABLE NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING OMP_NUM_THREADS DS_ACCELERATOR; do
    echo "export $v=${!v}"
  done
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

say() { echo "[$(date -u +%FT%TZ)] slurm_train.sh: job $SLURM_JOB_ID: $*"; }
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR"/*.exit  # this attempt's exit codes only
say "restart ${SLURM_RESTART_COUNT:-0}: $NNODES nodes x $NPROC_PER_NODE workers ($GPUS_PER_NODE GPUs per node)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, per-rank logs in $RUN_DIR/"
stop=""
on_usr1() {
  stop=USR1
  say "SIGUSR1: every rank saves at its next step boundary, then the job requeues itself"
  kill -USR1 "$pid" 2>/dev/null || true  # srun passes it to every process of the step
}
on_term() {
  stop=TERM
  say "SIGTERM (preemption, requeue, time limit or scancel): the ranks save at their next step boundary"
}
requeue() {
  say "$1; requeueing: the job restarts and resumes from the newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_usr1 USR1
trap on_term TERM
# In the background and waited for, so a trap runs at once instead of after srun returns.
"${CMD[@]}" &
pid=$!
while :; do
  if wait "$pid"; then rc=0; else rc=$?; fi
  if [ "$rc" -gt 128 ] && ! kill -0 "$pid" 2>/dev/null; then  # a trap cut the wait short as srun ended
    wait "$pid" 2>/dev/null && rc=0 || { r=$?; [ "$r" = 127 ] || rc=$r; }
  fi
  kill -0 "$pid" 2>/dev/null || break
done
[ "$stop" = TERM ] && { say "srun ended ($rc) after SIGTERM; SLURM requeues or ends the job"; exit "$rc"; }
[ "$rc" = 0 ] && [ "$stop" = USR1 ] && requeue "every rank saved after SIGUSR1"
[ "$rc" = 0 ] && { say "finished"; exit 0; }
if grep -qx 2 "$RUN_DIR"/*.exit 2>/dev/null; then
  say "a rank stopped with a run error (exit 2: see $RUN_DIR/*.log); not requeued"
  exit 2
fi
failures=$(( $(cat "$RUN_DIR/failures" 2>/dev/null || echo 0) + 1 ))
echo "$failures" >"$RUN_DIR/failures"
if [ "$failures" -le "${FAILURE_REQUEUES:-2}" ]; then
  requeue "srun failed ($rc), failure $failures of the ${FAILURE_REQUEUES:-2} that are requeued"
fi
say "srun failed ($rc), failure $failures: past FAILURE_REQUEUES=${FAILURE_REQUEUES:-2}, not requeued"
exit "$rc"
