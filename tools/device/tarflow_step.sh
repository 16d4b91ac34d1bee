#!/usr/bin/env bash
# Issue 13, the TarFlow row, on one nvidia-h200: where the TarFlow-only step at ml-tarflow's
# ImageNet-64 shape (configs/tarflow_imagenet64.yaml, batch 32) spends its time, and what pays.
# Parts, most important first (so a run cut short keeps them):
#  0. TEST=1: TESTS (default tests/train/test_step_graph.py: graphed steps == eager steps) on the GPU;
#  1. the step (tools/profile_step.py) with VARIANTS (default "after="), the last one traced (GPU
#     time by category, top kernels, GPU busy share); BASELINE=1 adds the Llama anchor (same process);
#  2. BEFORE=DIR: the step of the code in DIR (e.g. `git archive` of the commit before this work),
#     as its own default ("before"), in its own process;
#  3. BLOCK=1: one layer (tools/device/tarflow_block.py BLOCK_ARGS, default `--kernels
#     none,rope,rope+add_norm`: megaflow's Triton kernels one by one), kernel by kernel; AUTOTUNE=1 adds inductor's
#     max-autotune GEMM templates;
#  4. EXTRA='--variant "name=k=v"': more variants of the step in a process of their own (no trace).
# Usage on the device: bash tools/device/tarflow_step.sh   (writes under $OUT; STEPS, WARMUP;
# VARIANTS='--variant "a=k=v" --variant "b="')
. tools/device/setup.sh
OUT=${OUT:-/tmp/tarflow_step}; mkdir -p "$OUT"; T0=$(date +%s)
STEPS=${STEPS:-4}; WARMUP=${WARMUP:-2}
quiet() { grep -v "Warning\|^W1130\|warn\|^ *$\|_warn_once"; }
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
PROFILE="tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup $WARMUP --steps $STEPS --images-per-row 1"
if [ "${TEST:-0}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-35} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/train/test_step_graph.py} 2>&1 | tail -15 | tee "$OUT/checks.txt"
  since test
fi
eval "set -- ${VARIANTS:---variant after=}"
timeout ${STEP_TIMEOUT:-100} python3 $PROFILE ${BASELINE:+--baseline} "$@" \
  --trace "$OUT/trace" --trace-steps 2 --json "$OUT/tarflow.json" 2>&1 | quiet | tee "$OUT/tarflow.txt"
since step
rm -f "$OUT"/trace/trace.json "$OUT"/trace/top_ops.txt  # large / in tarflow.json; top_kernels.txt stays (8 files come back)
if [ -n "${BEFORE:-}" ]; then
  (cd "$BEFORE" && PYTHONPATH="$PWD:/tmp/site" timeout ${BEFORE_TIMEOUT:-70} python3 $PROFILE --variant "before=" \
    --json "$OUT/before.json" 2>&1 | quiet | tee "$OUT/before.txt")
  since before
fi
if [ "${BLOCK:-0}" = 1 ]; then
  timeout ${BLOCK_TIMEOUT:-60} python3 tools/device/tarflow_block.py ${BLOCK_ARGS:---kernels none,rope,rope+add_norm} 2>&1 | quiet | tee -a "$OUT/checks.txt"
  since block
fi
if [ "${AUTOTUNE:-0}" = 1 ]; then
  timeout 60 python3 tools/device/tarflow_block.py --variant max-autotune 2>&1 | quiet | tail -40 | tee "$OUT/block_autotune.txt"
  since autotune
fi
if [ -n "${EXTRA:-}" ]; then
  eval "set -- $EXTRA"
  timeout ${EXTRA_TIMEOUT:-90} python3 $PROFILE "$@" --json "$OUT/extra.json" 2>&1 | quiet | tee "$OUT/extra.txt"
  since extra
fi
