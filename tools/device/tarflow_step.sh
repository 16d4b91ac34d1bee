#!/usr/bin/env bash
# Issue 13, the TarFlow row, on one nvidia-h200: where the TarFlow-only step at ml-tarflow's
# ImageNet-64 shape (configs/tarflow_imagenet64.yaml, batch 32) spends its time, and what pays.
#  1. one layer (tools/device/tarflow_block.py): kernel by kernel, compiled as the step compiles it
#     and with inductor's max-autotune GEMM templates; a CUDA-graph replay; attention layouts;
#  2. the whole step (tools/profile_step.py): VARIANTS (default "after="), the last one traced
#     (GPU time by category, top kernels, GPU busy share); BASELINE=1 adds the Llama anchor.
# Usage on the device: bash tools/device/tarflow_step.sh   (writes under $OUT; BLOCK=0 skips part 1;
# STEPS, WARMUP; VARIANTS='--variant "a=..." --variant "b="')
. tools/device/setup.sh
OUT=${OUT:-/tmp/tarflow_step}; mkdir -p "$OUT"; T0=$(date +%s)
STEPS=${STEPS:-4}; WARMUP=${WARMUP:-2}
quiet() { grep -v "Warning\|^W1130\|warn\|^ *$\|_warn_once"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
if [ "${BLOCK:-1}" = 1 ]; then
  timeout 45 python3 tools/device/tarflow_block.py --variant default --attention 2>&1 | quiet | tee "$OUT/block_default.txt"
  echo "block default done after $(( $(date +%s) - T0 )) s"
  timeout 60 python3 tools/device/tarflow_block.py --variant max-autotune 2>&1 | quiet | tail -40 | tee "$OUT/block_autotune.txt"
  echo "block max-autotune done after $(( $(date +%s) - T0 )) s"
fi
eval "set -- ${VARIANTS:---variant after=}"
timeout ${STEP_TIMEOUT:-100} python3 tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda \
  --warmup $WARMUP --steps $STEPS --images-per-row 1 ${BASELINE:+--baseline} "$@" \
  --trace "$OUT/trace" --trace-steps 2 --json "$OUT/tarflow.json" 2>&1 | quiet | tee "$OUT/tarflow.txt"
echo "step done after $(( $(date +%s) - T0 )) s"
rm -f "$OUT"/trace/trace.json  # large; top_ops.txt and top_kernels.txt stay
