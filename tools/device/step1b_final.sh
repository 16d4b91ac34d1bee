#!/usr/bin/env bash
# The h200_1b row's final call (issue 13; docs/benchmarks.md "The fast step, round 4"), most important first:
#  0. tests/model/test_swiglu.py on the GPU (the one-pass SwiGLU kernel == its reference, padded rows too);
#  1. this checkout's default step and the plain-PyTorch anchor in one process (tools/device/mfu1b_step.sh);
#  2. the step as one CUDA graph: tools/device/graph_probe.py finds which setting captures (and, for
#     the first that fails, the first op after which the capture broke) and profiles the graphed step;
#  3. "before" (.before/: a `git archive` of the base commit) in its own process; AC=1: checkpointing rows.
# Usage on the device: bash tools/device/step1b_final.sh   (GRAPH_TIMEOUT, default 75 s; AC=1)
. tools/device/setup.sh
OUT=${OUT:-/tmp/step1b_out}; mkdir -p "$OUT"
export OUT
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/model/test_swiglu.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
ORDER="after" VARIANTS="--variant after=" bash tools/device/mfu1b_step.sh
timeout ${GRAPH_TIMEOUT:-75} python3 tools/device/graph_probe.py search -- --config configs/h200_1b.yaml --device cuda \
  --warmup 3 --steps 4 --variant graph=train.step_graph=on --json "$OUT/graph.json" 2>&1 \
  | grep -v "Warning\|warn\|^ *$" | tee "$OUT/graph.txt"
echo "graph done"
ORDER="before" bash tools/device/mfu1b_step.sh
