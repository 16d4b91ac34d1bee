#!/usr/bin/env bash
# One call on a lent nvidia-h200 (issue 13, the h200_1b row; docs/benchmarks.md "The fast step, round 3/4"),
# the most important first (a call cut short keeps what came before):
#  0. TEST=1: tests/model/test_swiglu.py and tests/train/test_step_graph.py on the GPU (the one-pass SwiGLU
#     kernel == its reference; graphed steps == eager steps, with the flat AdamW in the graph);
#  1. tools/device/step_micro.py --only $MICRO (e.g. swiglu, kernel,optimizer);
#  2. "before": the code extracted in $BEFORE (default .before/) beside this checkout (a `git archive` of
#     the commit to compare with), its default step, in its own process;
#  3. "after": this checkout's $VARIANTS (default: its default step, and the step as one CUDA graph),
#     the plain-PyTorch anchor in the same process, a kernel trace of the last variant (TRACE=1);
#  4. AC=1: selective and full activation checkpointing rows (a separate process).
# Usage on the device: bash tools/device/mfu1b_step.sh   (STEPS, WARMUP, MICRO, TEST=1, TRACE=1, AC=1, VARIANTS,
#   BEFORE, ORDER="after before" to run this checkout's rows first)
. tools/device/setup.sh
OUT=${OUT:-/tmp/mfu1b_out}; mkdir -p "$OUT"
STEPS=${STEPS:-4}; WARMUP=${WARMUP:-3}  # 3: the graphed step captures at its third call
VARIANTS=${VARIANTS:---variant after= --variant graph=train.step_graph=on}
BEFORE=${BEFORE:-.before}
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
quiet() { grep -v "Warning\|^W1130\|warn\|^\[rank\|^ *$\|checkpointed region\|_warn_once"; }
prof() { python3 tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup $WARMUP --steps $STEPS "$@"; }
if [ -n "${TEST:-}" ]; then
  timeout ${TEST_TIMEOUT:-60} python3 -m pytest -q -p no:cacheprovider tests/model/test_swiglu.py tests/train/test_step_graph.py \
    2>&1 | tail -15 | tee "$OUT/tests.txt"
  echo "tests done after $(( $(date +%s) - T0 )) s"
fi
if [ -n "${MICRO:-}" ]; then
  python3 tools/device/step_micro.py --only "$MICRO" 2>&1 | quiet | tee "$OUT/micro.txt"
  echo "micro done after $(( $(date +%s) - T0 )) s"
fi
before() {
  [ -d "$BEFORE" ] || return 0
  (cd "$BEFORE" && PYTHONPATH=$PWD prof --variant "before=" --json "$OUT/before.json" 2>&1 | quiet | tail -3 | tee "$OUT/before.txt")
  echo "before done after $(( $(date +%s) - T0 )) s"
}
after() {
  eval prof --baseline $VARIANTS ${TRACE:+--trace "$OUT/trace_1b" --trace-steps 2} --json "$OUT/after.json" 2>&1 | quiet | tee "$OUT/after.txt"
  echo "after done after $(( $(date +%s) - T0 )) s"
}
for part in ${ORDER:-before after}; do $part; done
rm -f "$OUT"/trace_*/trace.json  # large; the op table, categories and gaps stay
if [ -n "${AC:-}" ]; then
  prof --variant "ac_selective=train.activation_checkpointing=selective" --variant "ac_full=train.activation_checkpointing=full" \
    --json "$OUT/ac.json" 2>&1 | quiet | tail -4 | tee "$OUT/ac.txt"
  echo "ac done after $(( $(date +%s) - T0 )) s"
fi
