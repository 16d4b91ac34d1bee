#!/usr/bin/env bash
# One call on a lent nvidia-h200 (issue 13, docs/benchmarks.md "The fast step"): every figure of
# the fast training step, each beside the plain-PyTorch anchor measured in the same process.
#  1. configs/h200_1b.yaml (0.9B STARFlow2), synthetic batches without padding: before (fp32 weights
#     under bf16 autocast, eager), bf16 weights + each block compiled (compile_scope=block),
#     activation checkpointing selective / full, and "after" (the CUDA default: each Pretzel unit
#     and shallow coupling compiled whole); per-part times of the block variant; a torch.profiler
#     kernel breakdown of "after"; the Llama baseline of the VLM stream's width and depth.
#  2. configs/tarflow_imagenet64.yaml (ml-tarflow's ImageNet-64 shape, 466M parameters), batch 32:
#     before / after, img/s, the Llama baseline of 64 layers x 768.
#  3. (CG=1) h200_1b with train.compile_mode=reduce-overhead (CUDA graphs of the compiled regions).
# Usage on the device: bash tools/device/fast_step.sh   (STEPS, WARMUP, ONLY=1b|tarflow to narrow,
# AC=1 to add the activation-checkpointing rows, CG=1 the CUDA-graph row)
. tools/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
OUT=${OUT:-/tmp/fast_step_out}; mkdir -p "$OUT"
STEPS=${STEPS:-8}; WARMUP=${WARMUP:-3}
T0=$(date +%s)
quiet() { grep -v "Warning\|^W1130\|warn\|^\[rank\|^ *$\|checkpointed region\|_warn_once"; }
if [ "${ONLY:-1b}" != tarflow ]; then
python3 tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup $WARMUP --steps $STEPS \
  --baseline --parts block \
  --variant "before=train.param_dtype=fp32;train.compile=off" \
  --variant "block=train.compile_scope=block" \
  ${AC:+--variant "ac_selective=train.activation_checkpointing=selective"} \
  ${AC:+--variant "ac_full=train.activation_checkpointing=full"} \
  --variant "after=" \
  --trace "$OUT/trace_1b" --trace-steps 2 --json "$OUT/h200_1b.json" 2>&1 | quiet | tee "$OUT/h200_1b.txt"
echo "h200_1b done after $(( $(date +%s) - T0 )) s"
fi
if [ "${ONLY:-tarflow}" != 1b ]; then
python3 tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup $WARMUP --steps $STEPS \
  --images-per-row 1 --baseline \
  --variant "before=train.param_dtype=fp32;train.compile=off;train.step_graph=off" \
  --variant "after=" --json "$OUT/tarflow.json" 2>&1 | quiet | tee "$OUT/tarflow.txt"
echo "tarflow done after $(( $(date +%s) - T0 )) s"
fi
if [ -n "${CG:-}" ]; then
timeout 80 python3 tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup $WARMUP --steps $STEPS \
  --variant "cuda_graphs=train.compile_mode=reduce-overhead" --json "$OUT/h200_1b_cg.json" 2>&1 | quiet | tail -8 | tee "$OUT/h200_1b_cg.txt"
echo "cuda graphs done after $(( $(date +%s) - T0 )) s"
fi
rm -f "$OUT"/trace_*/trace.json  # large; the op tables and categories stay
