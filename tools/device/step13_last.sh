#!/usr/bin/env bash
# Issue 13's h200_1b row, session 7: what call 2 (step13_final.sh) lost to its limits, for a WARM x2 only
# (its inductor cache): GPU 0 the graphed step beside the plain-PyTorch anchor in one process (10 timed
# steps); GPU 1 the real-data rows (packed Fashion-MNIST through the data pipeline: the default, then
# the graph), then tests/model/test_add_norm.py on torch 2.11.
# Usage on the device: bash tools/device/step13_last.sh   (G_S R_S: limits in s)
. tools/device/setup.sh
OUT=${OUT:-/tmp/step13_out}; mkdir -p "$OUT"; T0=$(date +%s)
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3"
REAL="--real-data --set data.local=data_cache/fm1b/train --set data.tokenizer.path=data_cache/fm1b/tokenizer.model --set train.dataset_limit=8000"
quiet() { grep --line-buffered -v "Warning\|^W1130\|warnings.warn\|^ *$\|_warn_once\|checkpointed region\|^DEBUG"; }
(
  export CUDA_VISIBLE_DEVICES=0
  timeout ${G_S:-50} python3 tools/profile_step.py $PROF --steps 10 --baseline --variant graph=train.step_graph=on \
    2>&1 | quiet > "$OUT/graph_anchor.txt"
  since "gpu0: graph, anchor"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${R_S:-42} python3 tools/profile_step.py $PROF --steps 8 $REAL --variant real= --variant real_graph=train.step_graph=on \
    2>&1 | quiet > "$OUT/real.txt"
  since "gpu1: real data"
  timeout 10 python3 -m pytest -q -p no:cacheprovider tests/model/test_add_norm.py 2>&1 | grep -v "^DEBUG" | tail -3 > "$OUT/add_norm.txt"
) &
wait
for f in graph_anchor real add_norm; do echo "=== $f"; tail -${TAIL:-14} "$OUT/$f.txt"; done
