#!/usr/bin/env bash
# Issue 13 part B, first of two calls on one nvidia-h200: the model-level flex == dense CUDA test,
# SDPA backends at the TarFlow shape, and the new step (host-sync-free loop, in-kernel clipping,
# foreach gradient cast) with compile scope "block" vs "unit" on configs/h200_1b.yaml (traced) and
# TarFlow. Usage on the device: bash tools/device/mfu_probe.sh  (writes under $OUT)
. tools/device/setup.sh
OUT=${OUT:-/tmp/mfu_probe}; mkdir -p "$OUT"; T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/model/test_masks.py 2>&1 | tail -4 | tee "$OUT/test_masks.txt"
echo "masks done after $(( $(date +%s) - T0 )) s"
timeout 40 python3 tools/device/sdpa_backends.py 2>&1 | grep -v Warning | tee "$OUT/sdpa.txt"
echo "sdpa done after $(( $(date +%s) - T0 )) s"
timeout 150 python3 tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup 2 --steps 4 \
  --variant "block=train.compile_scope=block" --variant "unit=" \
  --trace "$OUT/trace_1b" --trace-steps 2 --json "$OUT/h200_1b.json" 2>&1 | grep -v "Warning\|^W1130\|warn" | tee "$OUT/h200_1b.txt"
echo "h200_1b done after $(( $(date +%s) - T0 )) s"
timeout 120 python3 tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup 2 --steps 3 \
  --images-per-row 1 --variant "block=train.compile_scope=block" --variant "unit=" \
  --json "$OUT/tarflow.json" 2>&1 | grep -v "Warning\|^W1130\|warn" | tee "$OUT/tarflow.txt"
echo "tarflow done after $(( $(date +%s) - T0 )) s"
rm -f "$OUT"/trace_*/trace.json
