#!/usr/bin/env bash
# Issue 13, the TarFlow row, round 3, in one call (nvidia-h200-x2: both GPUs at once; one GPU: one part after another):
#   GPU 0: "after" = this tree (configs/tarflow_imagenet64.yaml, batch 32, its default) with a trace, then
#          "before" = the tree in $BEFORE (`git archive 5bb1260`) in its own process: same GPU, one after the other;
#   GPU 1: attention kernels at TarFlow's shape (tools/device/sdpa_backends.py: cuDNN / flash / efficient /
#          cuDNN on the model's layout / FlexAttention), the SwiGLU backward's tiles (tools/device/tarflow_kernels.py),
#          then $ROWS (default batch 64, "the largest batch that fits") of this tree.
# With one GPU: after, before, the attention kernels, the SwiGLU tiles, in that order (the rest left out). Every part has its
# own timeout (all end by ~$LIMIT s after the start) and prints a line as it ends; logs come back in $OUT/logs.tgz.
# Usage on the device, from this tree: BEFORE=$PWD/base bash tools/device/tarflow_r3.sh
. tools/device/setup.sh
OUT=${OUT:-/tmp/tarflow_r3}; mkdir -p "$OUT"; T0=$(date +%s)
STEPS=${STEPS:-6}; WARMUP=${WARMUP:-3}; ROWS=${ROWS:---variant b64=data.batch_size=64}
NGPU=$(nvidia-smi -L | wc -l); LIMIT=${LIMIT:-$([ "$NGPU" -ge 2 ] && echo 120 || echo 130)}
left() { local s=$(( LIMIT - ($(date +%s) - T0) - ${1:-0} )); echo $(( s > 1 ? s : 1 )); }  # seconds to the end, less $1
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }  # $1 seconds, or what is left if less
at() { echo "$1 done at $(( $(date +%s) - T0 )) s"; }
quiet() { grep -v "Warning\|^W1[12]\|warn\|^ *$\|_warn_once"; }
PROFILE="tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup $WARMUP --steps $STEPS --images-per-row 1"
nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version())"
pair() {  # after (traced), then before, on GPU $1
  CUDA_VISIBLE_DEVICES=$1 timeout $(left $2) python3 $PROFILE --variant after= --trace "$OUT/trace" --trace-steps 2 \
    --json "$OUT/after.json" 2>&1 | quiet > "$OUT/after.txt"
  grep "^\[after\]" "$OUT/after.txt"; at "GPU$1 after"
  rm -f "$OUT"/trace/trace.json "$OUT"/trace/top_ops.txt
  if [ -n "${BEFORE:-}" ]; then
    (cd "$BEFORE" && PYTHONPATH="$PWD:/tmp/site" CUDA_VISIBLE_DEVICES=$1 timeout $(left $3) python3 $PROFILE --variant before= \
      --json "$OUT/before.json" 2>&1 | quiet > "$OUT/before.txt")
    grep "^\[before\]" "$OUT/before.txt"; at "GPU$1 before"
  fi
}
micro() {  # attention kernels, SwiGLU tiles, then (with $2 = full) the $ROWS step rows, on GPU $1
  CUDA_VISIBLE_DEVICES=$1 timeout $(cap 40) python3 tools/device/sdpa_backends.py 2>&1 | quiet | tee "$OUT/attn.txt"
  at "GPU$1 attention"
  CUDA_VISIBLE_DEVICES=$1 timeout $(cap 20) python3 tools/device/tarflow_kernels.py 2>&1 | quiet | tee "$OUT/kernels.txt"
  at "GPU$1 SwiGLU tiles"
  [ "$2" = full ] || return 0
  local gpu=$1; eval "set -- $ROWS"
  CUDA_VISIBLE_DEVICES=$gpu timeout $(left) python3 $PROFILE "$@" --json "$OUT/rows.json" 2>&1 | quiet > "$OUT/rows.txt"
  grep "^\[" "$OUT/rows.txt"; at "GPU$gpu rows"
}
if [ "$NGPU" -ge 2 ]; then
  pair 0 40 0 | sed -u 's/^/GPU0 /' &
  micro 1 full | sed -u 's/^/GPU1 /' &
  wait
else
  pair 0 55 30
  micro 0 short
fi
cd "$OUT" || exit 1
echo "--- after, in full:"; sed -n '/profile:/,/top kernels/p' after.txt | head -20 | cut -c1-220
sed -n '/top kernels/,/trace /p' after.txt | head -45 | cut -c1-160
tar czf logs.tgz ./*.txt $([ -d trace ] && echo trace) && rm -rf ./*.txt trace; ls "$OUT"  # 8 files come back at most
