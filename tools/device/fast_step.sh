#!/usr/bin/env bash
# One call on a lent nvidia-h200 (issue 13, docs/benchmarks.md "The fast step"): every figure of
# the fast training step, each beside the plain-PyTorch anchor measured in the same process.
#  1. configs/h200_1b.yaml (0.9B STARFlow2), synthetic batches without padding: before (fp32 weights
#     under bf16 autocast, eager), bf16 weights with fp32 main weights (eager), + per-block compile
#     ("after", the CUDA default), activation checkpointing selective / full; per-part times of
#     "after"; a torch.profiler kernel breakdown of the last variant; the Llama baseline of the
#     VLM stream's width and depth.
#  2. configs/tarflow_imagenet64.yaml (ml-tarflow's ImageNet-64 shape, 466M parameters), batch 32:
#     before / selective checkpointing / batch 48 / after, img/s, per-part times, the Llama
#     baseline of 64 layers x 768.
# Usage on the device: bash tools/device/fast_step.sh   (STEPS, WARMUP, ONLY=1b|tarflow to narrow,
# AC=1 to add the activation-checkpointing rows)
. tools/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
OUT=${OUT:-/tmp/fast_step_out}; mkdir -p "$OUT"
STEPS=${STEPS:-8}; WARMUP=${WARMUP:-3}
T0=$(date +%s)
if [ "${ONLY:-1b}" != tarflow ]; then
python3 tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup $WARMUP --steps $STEPS \
  --baseline --parts after \
  --variant "before=train.param_dtype=fp32;train.compile=off" \
  --variant "bf16_weights=train.compile=off" \
  ${AC:+--variant "ac_selective=train.activation_checkpointing=selective"} \
  ${AC:+--variant "ac_full=train.activation_checkpointing=full"} \
  --variant "after=" \
  --trace "$OUT/trace_1b" --trace-steps 2 --json "$OUT/h200_1b.json" 2>&1 | grep -v Warning | tee "$OUT/h200_1b.txt"
echo "h200_1b done after $(( $(date +%s) - T0 )) s"
fi
if [ "${ONLY:-tarflow}" != 1b ]; then
python3 tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup $WARMUP --steps $STEPS \
  --images-per-row 1 --baseline --parts after \
  --variant "before=train.param_dtype=fp32;train.compile=off" \
  --variant "ac_selective=train.activation_checkpointing=selective" \
  --variant "batch48=data.batch_size=48" \
  --variant "after=" \
  --trace "$OUT/trace_tarflow" --trace-steps 1 --json "$OUT/tarflow.json" 2>&1 | grep -v Warning | tee "$OUT/tarflow.txt"
echo "tarflow done after $(( $(date +%s) - T0 )) s"
fi
rm -f "$OUT"/trace_*/trace.json  # large; the op tables and categories stay
