#!/usr/bin/env bash
# One call on a lent nvidia-h200-x2: the NCCL runs of the parallelism issues (docs/benchmarks.md).
#  1. TP=2 vs TP=1 equality on CUDA/NCCL (fp32, TF32 off), then TP=1 / TP=2 / TP=2+SP step time and memory
#  2. ZeRO 0/1/2/3 at DP=2: optimizer state, memory and step time (0.9B config, bf16)
#  3. PP=2 step time, bubble and memory per stage (1F1B and interleaved)
. tools/device/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_ds/*.whl
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$(date +%s)
timeout 170 torchrun --nproc_per_node 2 tools/bench_tp.py --check --config configs/bench_tp.yaml --json $OUT/bench_tp.json 2>&1 \
  | grep -v "Warning\|warn" | tee $OUT/bench_tp.txt | tail -25
echo "tp done $(( $(date +%s) - T0 )) s"
timeout 170 torchrun --nproc_per_node 2 tools/bench_zero.py --device cuda --config configs/h200_1b.yaml \
  --stages 0,1,2,3 --rows 8 --steps 6 --warmup 2 --json $OUT/bench_zero.json 2>&1 | grep -v "Warning\|warn\|\[INFO\|\[WARNING" | tee $OUT/bench_zero.txt | tail -15
echo "zero done $(( $(date +%s) - T0 )) s"
timeout 150 torchrun --nproc_per_node 2 tools/bench_pp.py --device cuda --dtype bf16 --dim 2048 --units 16 \
  --seq-len 2048 --image-size 64 --mb-rows 1 --micro-batches 1,2,4,8 --steps 5 \
  --json $OUT/bench_pp.json 2>&1 | grep -v "Warning\|warn" | tee $OUT/bench_pp.txt | tail -25
echo "pp done $(( $(date +%s) - T0 )) s"
