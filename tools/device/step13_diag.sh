#!/usr/bin/env bash
# Issue 13's h200_1b row, session 7, call 1 (diagnosis) on nvidia-h200-x2, both GPUs at once:
#  GPU 1: tests/model/test_add_norm.py (failed on torch 2.11 in the lead's call; its tail is printed);
#         tools/device/graph_probe.py isolate (the flat AdamW alone, MainWeights' step on a small MLP
#         with the flat kernel, the kernel's torch definition compiled, each captured as a graph) and probe
#         --flat 1 (the tiny whole step), each retried in relaxed capture mode if it fails;
#  GPU 0: configs/h200_1b.yaml with train.step_graph=on and the flat AdamW in the graph (this branch),
#         with a kernel trace; if it does not capture, with torch's fused AdamW (as at 820d653). The
#         rows time the steps from the GPU's side too (CUDA events) and sample SM clock / power.
# Usage on the device: bash tools/device/step13_diag.sh   (logs in $OUT/logs.tgz; STEPS timed steps)
. tools/device/setup.sh
OUT=${OUT:-/tmp/step13_out}; L=/tmp/step13_logs; mkdir -p "$OUT" "$L"; T0=$(date +%s); STEPS=${STEPS:-12}
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3 --steps $STEPS"
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 60 python3 -m pytest -x -q -p no:cacheprovider tests/model/test_add_norm.py > "$L/add_norm.txt" 2>&1
  for c in kernel flat compiled; do
    timeout 40 python3 tools/device/graph_probe.py isolate --case $c || \
      timeout 40 python3 tools/device/graph_probe.py isolate --case $c --mode relaxed
  done > "$L/isolate.txt" 2>&1
  timeout 45 python3 tools/device/graph_probe.py probe --flat 1 > "$L/probe.txt" 2>&1 || \
    timeout 45 python3 tools/device/graph_probe.py probe --flat 1 --mode relaxed >> "$L/probe.txt" 2>&1
  since "gpu1"
) &
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 70 python3 tools/profile_step.py $PROF --variant graph_flat=train.step_graph=on --trace "$L/trace" --trace-steps 2 \
    --json "$L/graph_flat.json" > "$L/graph_flat.txt" 2>&1
  since "graph_flat"
  if grep -q "graph_flat.*failed" "$L/graph_flat.txt" || ! grep -q "^\[graph_flat\]" "$L/graph_flat.txt"; then
    timeout 60 python3 tools/device/graph_probe.py profile --flat 0 -- $PROF --variant graph_torch=train.step_graph=on \
      --json "$L/graph_torch.json" > "$L/graph_torch.txt" 2>&1
    since "graph_torch"
  fi
) &
wait
rm -f "$L/trace/trace.json"  # large; the tables stay
quiet() { grep -v "Warning\|^W1130\|warnings.warn\|^ *$\|_warn_once\|checkpointed region"; }
echo "=== add_norm (tail -40)"; tail -40 "$L/add_norm.txt"
for f in isolate probe; do echo "=== $f"; quiet < "$L/$f.txt" | grep -v "^  File\|^    " | tail -${TAIL:-14}; done
for f in graph_flat graph_torch; do [ -f "$L/$f.txt" ] || continue; echo "=== $f"; quiet < "$L/$f.txt" | sed '/^  trace /q' | tail -${TAIL:-45}; done
tar czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null
