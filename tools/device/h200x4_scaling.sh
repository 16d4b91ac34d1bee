#!/usr/bin/env bash
# Issue 20: weak scaling of configs/h200_1b.yaml (0.9B) on a lent nvidia-h200-x4 (or -x8), one GPU
# measured in the same call, every layout with ZeRO-1 and bf16 (tools/bench_scaling.py):
#   4 GPUs  one, dp4, dp2tp2, one_mb (PP's baseline, no ZeRO), dp2pp2 (1F1B), dp2pp2i (interleaved),
#           tp2pp2; then a sharded checkpoint of dp2tp2 resumed at dp2pp2
#   8 GPUs  one, dp8, one_mb, dp2tp2pp2; then dp2tp2pp2 resumed at dp8
#   2 GPUs  the dry run (what a lent nvidia-h200-x2 can prove): one, dp2, one_mb, pp2i; dp2 resumed at pp2i
# Per row: tokens/s per GPU, efficiency against one GPU (the pipelined rows too: bench_scaling's
# --pp-baseline one; one_mb, the same micro-batches accumulated on one GPU, is printed beside), peak memory
# per GPU, 1 - efficiency beside the bubble's theory (pipelined rows); the resume: save / load seconds and the next step's loss on both
# layouts. Results: $OUT/scaling_<NGPU>gpu.{txt,json}.
#   bash tools/device/h200x4_scaling.sh            # NGPU = the GPUs nvidia-smi lists
#   NGPU=2 ROWS=... RESUME=... bash tools/device/h200x4_scaling.sh
# ZeRO needs DeepSpeed, which the device image lacks: carry its wheels as .whl_ds/ (deepspeed, hjson,
# pydantic, pydantic_core, annotated_types, typing_inspection for Python 3.12); without them the rows
# run without ZeRO and the output says so.
. tools/device/setup.sh
if [ -d .whl_ds ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_ds/*.whl
fi
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1
case "$NGPU" in
  2) DEF_ROWS="one,dp2,one_mb,pp2i"; DEF_RESUME="dp2:pp2i" ;;
  4) DEF_ROWS="one,dp4,dp2tp2,one_mb,dp2pp2,dp2pp2i,tp2pp2"; DEF_RESUME="dp2tp2:dp2pp2" ;;
  8) DEF_ROWS="one,dp8,one_mb,dp2tp2pp2"; DEF_RESUME="dp2tp2pp2:dp8" ;;
  *) echo "h200x4_scaling.sh: NGPU=$NGPU; this script knows 2 (dry run), 4 and 8 GPUs"; exit 2 ;;
esac
ZERO=1
if ! python3 -c "import deepspeed" 2>/dev/null; then
  ZERO=0; echo "no DeepSpeed here (.whl_ds not carried): every row runs WITHOUT ZeRO (ParallelEngine)"
fi
# one_mb: one GPU accumulating the pipelined rows' micro-batches (plain gradient accumulation, no ZeRO)
MODES=$(echo "${ROWS:-$DEF_ROWS}" | sed 's/\bone_mb\b/one_mb@parallel.zero_stage=0/')
T0=$(date +%s)
set -o pipefail
timeout "${LIMIT:-900}" torchrun --nproc_per_node "$NGPU" tools/bench_scaling.py --config configs/h200_1b.yaml \
  --set parallel.zero_stage=$ZERO --rows 8 --micro-batches 8 --steps "${STEPS:-5}" --warmup "${WARMUP:-2}" \
  --profile "${PROFILE:-1}" --modes "$MODES" --resume "${RESUME-$DEF_RESUME}" --resume-dir /tmp/scaling_ckpt \
  --json "$OUT/scaling_${NGPU}gpu.json" 2>&1 | grep -v "Warning\|warn(\|\[INFO\|\[WARNING" | tee "$OUT/scaling_${NGPU}gpu.txt"
rc=$?
echo "== scaling on $NGPU GPUs (ZeRO stage $ZERO) done at $(( $(date +%s) - T0 )) s, rc $rc"
