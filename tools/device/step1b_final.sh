#!/usr/bin/env bash
# The h200_1b row's final call (issue 13; docs/benchmarks.md "The fast step, round 4"), most important first:
#  1. this checkout's default step and the plain-PyTorch anchor in one process, "before" (.before/: a
#     `git archive` of the base commit) in its own process (tools/device/mfu1b_step.sh, ORDER="after before");
#  2. the step as one CUDA graph: tools/device/graph_probe.py finds which setting captures (and, for
#     the first that fails, the first op after which the capture broke) and profiles the graphed step;
#  3. selective / full activation checkpointing rows (AC=1), last, cut first when time runs out.
# Usage on the device: bash tools/device/step1b_final.sh   (GRAPH_TIMEOUT, default 100 s)
. tools/device/setup.sh
OUT=${OUT:-/tmp/step1b_out}; mkdir -p "$OUT"
export OUT
ORDER="after" VARIANTS="--variant after=" bash tools/device/mfu1b_step.sh
timeout ${GRAPH_TIMEOUT:-100} python3 tools/device/graph_probe.py search -- --config configs/h200_1b.yaml --device cuda \
  --warmup 3 --steps 4 --variant graph=train.step_graph=on --json "$OUT/graph.json" 2>&1 \
  | grep -v "Warning\|warn\|^ *$" | tee "$OUT/graph.txt"
echo "graph done"
ORDER="before" VARIANTS="--variant after=" AC=1 bash tools/device/mfu1b_step.sh
