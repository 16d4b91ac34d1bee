#!/usr/bin/env bash
# One nvidia-h200-x2 call after merging issues 11-15 (2026-11-30): what the merged code does on GPUs.
#  1. attention over packed rows (issue 12): FlexAttention vs dense mask vs is_causal, T=4096, ~8 docs/row,
#     and the flex == dense tests (forward and gradients) on CUDA
#  2. the h200_1b step on real-data packing layouts (tools/device/layouts_h200_1b.json, made by
#     tools/bench_loader.py --layouts on Fashion-MNIST): the old step (old packer's layouts, dense mask,
#     fp32 weights under autocast, eager) vs the merged default (token-budget layouts, FlexAttention,
#     bf16 weights + fp32 main weights, per-block compile), same process type, same GPU
#  3. sharded checkpoints (issue 15) on 2 GPUs: tools/device/h200x2_checkpoint.sh (TP2 rows; the ZeRO
#     rows need DeepSpeed wheels, not carried)
. tools/device/setup.sh
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== 1. attention"
CUDA_VISIBLE_DEVICES=0 timeout 100 python3 tools/bench_attention.py --json $OUT/attn.json 2>&1 | tail -16
CUDA_VISIBLE_DEVICES=0 timeout 70 python3 -m pytest -q -p no:cacheprovider --tb=line tests/model/test_masks.py 2>&1 | grep -v DEBUG | tail -6
echo "t=$(( $(date +%s) - T0 )) s"
echo "== 2. h200_1b step on real layouts"
CUDA_VISIBLE_DEVICES=0 timeout 80 python3 tools/device/bench_packing_step.py --layouts tools/device/layouts_h200_1b.json \
  --variants before --set train.param_dtype=fp32 --set train.compile=off --steps 8 --warmup 2 --json $OUT/step_before.json 2>&1 | tail -4
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 tools/device/bench_packing_step.py --layouts tools/device/layouts_h200_1b.json \
  --variants packed-dense packed-flex --steps 8 --warmup 3 --json $OUT/step_after.json 2>&1 | tail -5
echo "t=$(( $(date +%s) - T0 )) s"
echo "== 3. checkpoints"
CKPT_TIMEOUT=200 bash tools/device/h200x2_checkpoint.sh
echo "t=$(( $(date +%s) - T0 )) s"
