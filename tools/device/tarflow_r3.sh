#!/usr/bin/env bash
# Issue 13, the TarFlow row, round 3, one call on nvidia-h200-x2 (both GPUs at once, each its own processes):
#   GPU 0: "after" = this tree (configs/tarflow_imagenet64.yaml, batch 32, its default) with a trace, then
#          "before" = the tree in $BEFORE (`git archive 5bb1260`) in its own process: same GPU, one after the other;
#   GPU 1: attention kernels at TarFlow's shape (tools/device/sdpa_backends.py: cuDNN / flash / efficient /
#          cuDNN on the model's layout / FlexAttention), the layer's 12 GEMMs cuBLAS vs TunableOp
#          (tools/device/tarflow_gemms.py), then batch 64 ("the largest batch that fits") of this tree.
# Every part has its own timeout (all end by ~$LIMIT s) and prints as it goes; logs under $OUT.
# Usage on the device, from this tree: BEFORE=$PWD/base bash tools/device/tarflow_r3.sh
. tools/device/setup.sh
OUT=${OUT:-/tmp/tarflow_r3}; mkdir -p "$OUT"; T0=$(date +%s); LIMIT=${LIMIT:-110}
STEPS=${STEPS:-6}; WARMUP=${WARMUP:-3}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }  # seconds until the whole script must be done
quiet() { grep -v "Warning\|^W1[12]\|warn\|^ *$\|_warn_once"; }
PROFILE="tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup $WARMUP --steps $STEPS --images-per-row 1"
nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuDNN', torch.backends.cudnn.version())"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout $(( $(left) - 40 )) python3 $PROFILE --variant after= --trace "$OUT/trace" --trace-steps 2 \
    --json "$OUT/after.json" 2>&1 | quiet > "$OUT/after.txt"
  grep "^\[after\]" "$OUT/after.txt" | sed 's/^/GPU0 /'; echo "GPU0 after done at $(( $(date +%s) - T0 )) s"
  rm -f "$OUT"/trace/trace.json "$OUT"/trace/top_ops.txt
  [ -n "${BEFORE:-}" ] && (cd "$BEFORE" && timeout $(left) python3 $PROFILE --variant before= \
    --json "$OUT/before.json" 2>&1 | quiet > "$OUT/before.txt"
    grep "^\[before\]" "$OUT/before.txt" | sed 's/^/GPU0 /'; echo "GPU0 before done at $(( $(date +%s) - T0 )) s")
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 35 python3 tools/device/sdpa_backends.py 2>&1 | quiet | tee "$OUT/attn.txt" | sed 's/^/GPU1 /'
  timeout 20 python3 tools/device/tarflow_gemms.py 2>&1 | quiet | tee "$OUT/gemms.txt" | sed 's/^/GPU1 /'
  echo "GPU1 micro-benchmarks done at $(( $(date +%s) - T0 )) s"
  timeout $(left) python3 $PROFILE --variant b64=data.batch_size=64 --json "$OUT/b64.json" 2>&1 | quiet > "$OUT/b64.txt"
  grep "^\[b64\]" "$OUT/b64.txt" | sed 's/^/GPU1 /'; echo "GPU1 b64 done at $(( $(date +%s) - T0 )) s"
) &
wait
cd "$OUT" || exit 1
echo "--- after, in full:"; sed -n '/profile:/,/top kernels/p' after.txt | head -20
sed -n '/top kernels/,/trace /p' after.txt | head -45 | cut -c1-160
tar czf logs.tgz *.txt trace 2>/dev/null && rm -rf *.txt trace; ls "$OUT"  # 8 files come back at most
