#!/usr/bin/env bash
# Issue 13's h200_1b row, session 7, call 2 (the figures) on nvidia-h200-x2, both GPUs at once, every
# part under its own limit, its log written to $OUT as it finishes (a call cut short keeps what ran):
#  GPU 0: configs/h200_1b.yaml in one process: this checkout's default ("after"), the step as one CUDA
#         graph ("graph", train.step_graph=on: the flat AdamW in it), the plain-PyTorch anchor; STEPS
#         timed steps each, synced and back to back, GPU-side times, SM clock and power; then the
#         activation-checkpointing rows (selective, full) in a second process;
#  GPU 1: the CUDA-only tests (graphed == eager with both AdamWs, the one-pass kernels, add_norm under
#         torch.compile); "before" (.before/ = `git archive 820d653`, its default, its own process);
#         real data: packed Fashion-MNIST documents through the data pipeline (data_cache/fm1b: 8,000
#         documents built by `megaflow train`'s prepare step), the default and the graph.
# Usage on the device: bash tools/device/step13_final.sh   (A_S AC_S T_S B_S R_S: limits in s)
. tools/device/setup.sh
OUT=${OUT:-/tmp/step13_out}; mkdir -p "$OUT"; T0=$(date +%s); STEPS=${STEPS:-20}
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv,noheader
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3"
REAL="--real-data --set data.local=data_cache/fm1b/train --set data.tokenizer.path=data_cache/fm1b/tokenizer.model --set train.dataset_limit=8000"
quiet() { grep --line-buffered -v "Warning\|^W1130\|warnings.warn\|^ *$\|_warn_once\|checkpointed region\|^DEBUG"; }
(
  export CUDA_VISIBLE_DEVICES=0
  timeout ${A_S:-70} python3 tools/profile_step.py $PROF --steps $STEPS --baseline --variant after= \
    --variant graph=train.step_graph=on 2>&1 | quiet > "$OUT/after.txt"
  since "gpu0: after, graph, anchor"
  timeout ${AC_S:-40} python3 tools/profile_step.py $PROF --steps 10 --variant ac_selective=train.activation_checkpointing=selective \
    --variant ac_full=train.activation_checkpointing=full 2>&1 | quiet > "$OUT/ac.txt"
  since "gpu0: ac"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${T_S:-45} python3 -m pytest -q -p no:cacheprovider tests/train/test_step_graph.py tests/model/test_add_norm.py \
    tests/model/test_swiglu.py tests/model/test_rope.py 2>&1 | grep --line-buffered -v "^DEBUG" > "$OUT/tests.txt"
  since "gpu1: tests"
  [ -d .before ] && (cd .before && PYTHONPATH="$PWD:/tmp/site" timeout ${B_S:-30} python3 tools/profile_step.py $PROF \
    --steps 15 --variant before= 2>&1 | quiet > "$OUT/before.txt")
  since "gpu1: before"
  timeout ${R_S:-45} python3 tools/profile_step.py $PROF --steps 10 $REAL --variant real= --variant real_graph=train.step_graph=on \
    2>&1 | quiet > "$OUT/real.txt"
  since "gpu1: real data"
) &
wait
echo "=== tests"; tail -6 "$OUT/tests.txt"
for f in after before real ac; do echo "=== $f"; grep -v "^\[" "$OUT/$f.txt" | tail -${TAIL:-12}; done
