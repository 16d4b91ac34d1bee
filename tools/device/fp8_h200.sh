#!/usr/bin/env bash
# Issue 19 on ONE H200 (nvidia-h200), no Transformer Engine needed: FP8 on torch's own
# `torch._scaled_mm` (megaflow/fp8.py, parallel.fp8_backend=torch) against our fastest bf16 path
# (local layers, compiled) at configs/h200_3b.yaml. docs/benchmarks.md "FP8 on torch._scaled_mm"
# holds the figures. PARTS picks what runs, in this order (default: all); each part has its own cap
# (seconds) so the whole fits one call:
#  layers  per-layer forward+backward, VLM then flow linears: bf16, FP8 compiled with the norm in
#          front, FP8 GEMMs alone (tools/bench_fp8_layers.py)                         LAYERS_S=30
#  speed   end to end, synthetic batch of SPEED_B x 1024 tokens: local:off vs torch:current:2048
#          (FP8 on every block linear of width >= 2048; tools/bench_fp8.py; SPEED_VARIANTS) SPEED_S=100
#  curves  300 steps of real Fashion-MNIST documents, CURVE_B x 1024 tokens a step, same seed and
#          batches, FP8 then BF16 (both compiled, local layers); then text cross-entropy and image
#          bits/dim side by side in 50-step windows (FP8: fp8_min_dim=CURVE_MIN_DIM=2048) CURVE_S=115 each
# curves need the data: carry .whl (mosaicml-streaming and its compression libs) and .fmnist in
# this checkout copy (tools/device/fp8_h200x2.sh says how they were made). Logs under $OUT.
. tools/device/setup.sh
mkdir -p /tmp/data_cache && ln -sfn /tmp/data_cache data_cache
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
C=configs/h200_3b.yaml
PARTS=${PARTS:-layers speed curves}
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
if has layers; then
  timeout ${LAYERS_S:-30} python3 tools/bench_fp8_layers.py --config $C --blocks vlm,flow --warmup 3 --reps 10 \
    --json $OUT/layers.json > $OUT/layers.log 2>&1; el "layers done"
  grep -vE "^W1|^ *$" $OUT/layers.log | tail -12
fi
if has speed; then
  timeout ${SPEED_S:-100} python3 tools/bench_fp8.py --config $C --set data.batch_size=${SPEED_B:-8} --steps 5 --warmup 2 \
    --variants ${SPEED_VARIANTS:-local:off,torch:current:2048} --set train.param_dtype=bf16 --json $OUT/speed.json \
    > $OUT/speed.log 2>&1; el "speed done"
  grep -A8 "^variant" $OUT/speed.log; grep -E "failed|Error" $OUT/speed.log | head -5
fi
curve() {  # curve FP8 NAME
  timeout ${CURVE_S:-115} python3 -m megaflow.cli train --config $C --set data.batch_size=${CURVE_B:-4} \
    --set train.steps=300 --set train.warmup=20 --set train.log_every=1 --set train.save_every=-1 \
    --set train.dataset_limit=20000 --set data.num_workers=4 --set train.param_dtype=bf16 \
    --set parallel.fp8=$1 --set parallel.fp8_backend=torch --set parallel.fp8_min_dim=${CURVE_MIN_DIM:-2048} --set train.out_dir=/tmp/curve_$2 2>&1 \
    | tr '\r' '\n' | grep -v overflow > $OUT/curve_$2.log
  el "curve $2 done"; grep -E "Error|Traceback" $OUT/curve_$2.log | head -3
}
if has curves; then
  curve current fp8; curve off bf16
  python3 tools/device/fp8_curves.py /tmp/curve_bf16/tb /tmp/curve_fp8/tb | tee $OUT/curves.txt
fi
el total
