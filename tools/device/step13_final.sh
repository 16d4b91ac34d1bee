#!/usr/bin/env bash
# Issue 13's h200_1b row, session 7, call 2 (the figures) on nvidia-h200-x2, both GPUs at once:
#  GPU 0: configs/h200_1b.yaml in one process: this checkout's default ("after"), the step as one CUDA
#         graph ("graph", train.step_graph=on: the flat AdamW in it), the plain-PyTorch anchor; STEPS
#         timed steps each, synced and back to back, GPU-side times, SM clock and power;
#  GPU 1: the CUDA-only tests (graphed == eager with both AdamWs, the one-pass kernels, add_norm under
#         torch.compile); "before" (.before/ = `git archive 820d653`, its default, its own process);
#         real data: packed Fashion-MNIST documents from the data pipeline (data_cache/fm1b, 8,000
#         documents built by `megaflow train`'s prepare step), the default and the graph; then the
#         activation-checkpointing rows (selective, full) if time is left.
# Usage on the device: bash tools/device/step13_final.sh   (logs in $OUT/logs.tgz; A_S T_S B_S R_S AC_S: limits)
. tools/device/setup.sh
OUT=${OUT:-/tmp/step13_out}; L=/tmp/step13_logs; mkdir -p "$OUT" "$L"; T0=$(date +%s); STEPS=${STEPS:-20}
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv,noheader
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3 --steps $STEPS"
REAL="--real-data --set data.local=data_cache/fm1b/train --set data.tokenizer.path=data_cache/fm1b/tokenizer.model --set train.dataset_limit=8000"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout ${A_S:-110} python3 tools/profile_step.py $PROF --baseline --variant after= --variant graph=train.step_graph=on \
    --json "$L/after.json" > "$L/after.txt" 2>&1
  since "gpu0 (after, graph, anchor)"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${T_S:-50} python3 -m pytest -q -p no:cacheprovider tests/train/test_step_graph.py tests/model/test_add_norm.py \
    tests/model/test_swiglu.py tests/model/test_rope.py > "$L/tests.txt" 2>&1
  since "tests"
  [ -d .before ] && (cd .before && PYTHONPATH="$PWD:/tmp/site" timeout ${B_S:-45} python3 tools/profile_step.py $PROF \
    --variant before= --json "$L/before.json" > "$L/before.txt" 2>&1)
  since "before"
  timeout ${R_S:-75} python3 tools/profile_step.py $PROF $REAL --variant real= --variant real_graph=train.step_graph=on \
    --json "$L/real.json" > "$L/real.txt" 2>&1
  since "real data"
  timeout ${AC_S:-60} python3 tools/profile_step.py $PROF --variant ac_selective=train.activation_checkpointing=selective \
    --variant ac_full=train.activation_checkpointing=full --json "$L/ac.json" > "$L/ac.txt" 2>&1
  since "gpu1 (tests, before, real, ac)"
) &
wait
quiet() { grep -v "Warning\|^W1130\|warnings.warn\|^ *$\|_warn_once\|checkpointed region"; }
echo "=== tests"; tail -8 "$L/tests.txt"
for f in after before real ac; do echo "=== $f"; quiet < "$L/$f.txt" | tail -${TAIL:-16}; done
tar czf "$OUT/logs.tgz" -C "$L" . 2>/dev/null
