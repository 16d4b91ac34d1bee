#!/usr/bin/env bash
# The lead's check of the merged code in ONE call on nvidia-h200-x2 (2 GPUs), every part under its own limit:
#  GPU 0: configs/h200_1b.yaml, its default with the plain-PyTorch anchor in one process (STEPS timed steps),
#         then `train.step_graph=on` in a process of its own (the graph's private pool stays out of the first);
#  GPU 1, at the same time: the CUDA-only tests of the session's kernels and of the graphed step, then the
#         TarFlow-only step at ml-tarflow's shape (configs/tarflow_imagenet64.yaml, batch 32, its default);
#  then both GPUs: compiled TP2 and TP2+SP of the 1b config with dynamo's graph breaks and recompiles logged
#         (tools/device/h200x2_overlap.sh async), where TP2+SP's host time comes from.
# Usage on the device: bash tools/device/merged_check.sh   (logs under $OUT; A_S, G_S, T_S, F_S, B_S: limits)
. tools/device/setup.sh
OUT=${OUT:-/tmp/merged_check}; mkdir -p "$OUT"; T0=$(date +%s); STEPS=${STEPS:-20}
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ONE="tools/profile_step.py --config configs/h200_1b.yaml --device cuda --warmup 3 --steps $STEPS"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout ${A_S:-120} python3 $ONE --baseline --variant after= --json "$OUT/1b.json" > "$OUT/1b.txt" 2>&1
  timeout ${G_S:-80} python3 $ONE --variant graph=train.step_graph=on --json "$OUT/1b_graph.json" > "$OUT/1b_graph.txt" 2>&1
  since "gpu0 (h200_1b)"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${T_S:-70} python3 -m pytest -q -p no:cacheprovider tests/train/test_step_graph.py tests/model/test_rope.py \
    tests/model/test_add_norm.py tests/model/test_swiglu.py > "$OUT/tests.txt" 2>&1
  timeout ${F_S:-110} python3 tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup 3 \
    --steps 8 --images-per-row 1 --variant after= --json "$OUT/tarflow.json" > "$OUT/tarflow.txt" 2>&1
  since "gpu1 (tests, tarflow)"
) &
wait
ROWS=${ROWS:-tp2sp,tp2} ASYNC_S=${B_S:-140} bash tools/device/h200x2_overlap.sh async > "$OUT/tp.txt" 2>&1
since "tp2 / tp2sp"
for f in 1b 1b_graph tests tarflow tp; do echo "=== $f"; grep -v "Warning\|warn\|^W1130\|^ *$" "$OUT/$f.txt" | tail -${TAIL:-25}; done
echo "=== graph breaks / recompiles (counts by message start)"
grep -h "Graph break\|Recompiling\|graph_break\|recompil" "$OUT/tp.txt" | cut -c1-160 | sort | uniq -c | sort -rn | head -25
