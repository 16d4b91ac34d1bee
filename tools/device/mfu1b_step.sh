#!/usr/bin/env bash
# One call on a lent nvidia-h200 (issue 13, the h200_1b row; docs/benchmarks.md "The fast step, round 3"),
# the most important first (a call cut short keeps what came before):
#  1. tools/device/step_micro.py --only $MICRO: the flat AdamW kernel's check and time (GQA, SwiGLU on request);
#  2. "before": the code of main at 6b0e4c2 (extracted in .before/ beside this checkout), its default step;
#  3. "after": this checkout's default step, the plain-PyTorch anchor in the same process, a kernel trace with
#     the GPU's idle gaps (TRACE=1);
#  4. AC=1: selective and full activation checkpointing rows (a separate process).
# Usage on the device: bash tools/device/mfu1b_step.sh   (STEPS, WARMUP, MICRO=kernel,optimizer, TRACE=1, AC=1)
. tools/device/setup.sh
OUT=${OUT:-/tmp/mfu1b_out}; mkdir -p "$OUT"
STEPS=${STEPS:-4}; WARMUP=${WARMUP:-2}
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
quiet() { grep -v "Warning\|^W1130\|warn\|^\[rank\|^ *$\|checkpointed region\|_warn_once"; }
prof() { python3 tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup $WARMUP --steps $STEPS "$@"; }
if [ -n "${MICRO:-}" ]; then
  python3 tools/device/step_micro.py --only "$MICRO" 2>&1 | quiet | tee "$OUT/micro.txt"
  echo "micro done after $(( $(date +%s) - T0 )) s"
fi
if [ -d .before ]; then
  (cd .before && PYTHONPATH=$PWD prof --variant "before=" --json "$OUT/before.json" 2>&1 | quiet | tail -3 | tee "$OUT/before.txt")
  echo "before done after $(( $(date +%s) - T0 )) s"
fi
prof --baseline --variant "after=" ${TRACE:+--trace "$OUT/trace_1b" --trace-steps 2} --json "$OUT/after.json" 2>&1 | quiet | tee "$OUT/after.txt"
echo "after done after $(( $(date +%s) - T0 )) s"
rm -f "$OUT"/trace_*/trace.json  # large; the op table, categories and gaps stay
if [ -n "${AC:-}" ]; then
  prof --variant "ac_selective=train.activation_checkpointing=selective" --variant "ac_full=train.activation_checkpointing=full" \
    --json "$OUT/ac.json" 2>&1 | quiet | tail -4 | tee "$OUT/ac.txt"
  echo "ac done after $(( $(date +%s) - T0 )) s"
fi
