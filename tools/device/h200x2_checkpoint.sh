#!/usr/bin/env bash
# One call on a lent nvidia-h200-x2 (issue 15): checkpoint save / load times and memory of the 0.9B
# config, sharded (DCP, sync and async) against the old gather path, measured in the same runs:
#  1. DP2 with ZeRO-1 (bf16 weights, fp32 masters and moments over DP), if DeepSpeed is available:
#     sharded + async rows, then the gather rows, in separate processes
#  2. TP2 without ZeRO (ParallelEngine): all rows in one process (sharded first)
. tools/device/setup.sh
if [ -d .whl_ds ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_ds/*.whl
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
df -h /tmp | tail -1
T0=$(date +%s)
if python3 -c "import deepspeed" 2>/dev/null; then
  for ROWS in sharded,async gather; do  # separate processes: host memory of each path from a clean start
    timeout ${CKPT_TIMEOUT:-280} torchrun --nproc_per_node 2 tools/bench_checkpoint.py --config configs/h200_1b.yaml \
      --set parallel.zero_stage=1 --rows $ROWS --dir /tmp/ckpt_bench --json $OUT/ckpt_dp2_zero1_${ROWS/,/_}.json 2>&1 \
      | grep -v "Warning\|warn\|\[INFO\|\[WARNING" | tee $OUT/ckpt_dp2_zero1_${ROWS/,/_}.txt | tail -8
  done
else
  echo "no deepspeed here (.whl_ds not carried): the ZeRO-1 rows are skipped"
fi
echo "dp2 done $(( $(date +%s) - T0 )) s"
timeout ${CKPT_TIMEOUT:-280} torchrun --nproc_per_node 2 tools/bench_checkpoint.py --config configs/h200_1b.yaml \
  --set parallel.tp=2 --set parallel.zero_stage=0 --dir /tmp/ckpt_bench --json $OUT/ckpt_tp2.json 2>&1 \
  | grep -v "Warning\|warn\|\[INFO\|\[WARNING" | tee $OUT/ckpt_tp2.txt | tail -12
echo "tp2 done $(( $(date +%s) - T0 )) s"
