#!/usr/bin/env bash
# One worker of a SLURM job (torchrun runs it, launchers/slurm_train.sh builds that line): runs
# `python -m megaflow.cli ARGS` with its output in MEGAFLOW_RUN_DIR/<node>.rank<global rank>.log
# (appended across restarts; rank 0's output also goes to the job log) and its exit code in
# <node>.rank<R>.exit, which the batch shell reads (exit 2, a run error, is never requeued).
#
# SIGTERM and SIGUSR1 are ignored by this shell and its tee, and so by python until megaflow
# installs its handler (megaflow/stop.py): the signal stops the training at a step boundary,
# after a save, while this shell stays to record the exit code.
set -uo pipefail
trap '' TERM USR1
: "${MEGAFLOW_RUN_DIR:?set by launchers/slurm_train.sh}" "${RANK:?set by torchrun}"
name=$MEGAFLOW_RUN_DIR/${SLURMD_NODENAME:-$(hostname -s)}.rank$RANK
echo "=== $(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: rank $RANK of ${WORLD_SIZE:-?}" \
     "(local ${LOCAL_RANK:-?}) on ${SLURMD_NODENAME:-$(hostname -s)}, pid $$" >>"$name.log"
if [ "$RANK" = 0 ]; then
  "${PYTHON:-python3}" -m megaflow.cli "$@" > >(tee -a "$name.log") 2> >(tee -a "$name.log" >&2)
else
  "${PYTHON:-python3}" -m megaflow.cli "$@" >>"$name.log" 2>&1
fi
rc=$?
echo "$rc" >"$name.exit"
echo "=== $(date -u +%FT%TZ) rank $RANK exited $rc" >>"$name.log"
exit "$rc"
