#!/usr/bin/env bash
# Issue 19: FP8 on torch's own `torch._scaled_mm` (megaflow/fp8.py, parallel.fp8_backend=torch) against
# our fastest bf16 path (local layers, compiled) at configs/h200_3b.yaml, in one call on an
# nvidia-h200-x2 (on one GPU the GPU-1 parts run after the GPU-0 ones, and tp2/pp2 are skipped).
# docs/benchmarks.md "FP8 on torch._scaled_mm" and "FP8 on torch._scaled_mm, round 2" hold the figures.
# Everything runs under one clock: each part's timeout is its own cap or what is left of its phase,
# whichever is less (phase 1 ends P1_S seconds after the start, the call TOTAL_S seconds after it).
# PARTS picks what runs (default: speed curves tp2 pp2; layers, probe and pp2s on request).
# Phase 1, the two GPUs side by side:
#  GPU 0  speed   end to end, synthetic batch of SPEED_B x 1024 tokens, the variants SPEED_VARIANTS
#                 (tools/bench_fp8.py); variants TRACE_VARIANTS (indices, default 0,2: BF16 and FP8)
#                 then take one profiled step (GPU time by kernel category, top kernels)    SPEED_S=210
#         layers  then per-layer forward+backward of the VLM and flow linears (tools/bench_fp8_layers.py) LAYERS_S=30
#         probe   then the FP8 cast / cast-transpose kernels alone, GB/s against a bf16 copy
#                 (tools/device/fp8_cast_probe.py: the next lever's choice)                PROBE_S=60
#  GPU 1  curves  300 steps of real Fashion-MNIST documents, CURVE_B x 1024 tokens a step, same seed and
#                 batches, every run of CURVES (NAME:FP8[:MIN_DIM], compiled, local layers) at once on
#                 the one GPU (~60 GiB each at 4 rows); then text cross-entropy and image bits/dim of
#                 each FP8 run beside the first run's, in 50-step windows (tools/device/fp8_curves.py) CURVE_S=210
# Phase 2, both GPUs together:
#  tp2    TP2 BF16 vs TP2 FP8 (fp8_min_dim=MIN_DIM), compiled, TP_B rows (tools/bench_scaling.py) TP_S=110
#  pp2    PP2 with FP8 (MIN_DIM), 4 micro-batches, full activation checkpointing, 50 steps of real data:
#         a finite, falling loss (compiled: 90 s did not reach its first step)               PP2_S=90
#  pp2s   the same eager (no compile time), 4 rows a step: the loss every 5 steps, so a run cut
#         short still shows how far it got (52 s of a warm call were not enough)            PP2S_S=150
# curves and pp2 need the data: carry .whl (mosaicml-streaming and its compression libs) and .fmnist
# in this checkout copy (tools/device/fp8_h200x2.sh says how they were made). Logs: $OUT/fp8_logs.tgz.
. tools/device/setup.sh
mkdir -p /tmp/data_cache && ln -sfn /tmp/data_cache data_cache
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
P1=${P1_S:-220}; TOTAL=${TOTAL_S:-355}
within() {  # within CAP END: CAP, or the seconds left until END (seconds after the start), if fewer
  local c=$1 l=$(( $2 - $(date +%s) + T0 )); (( l < c )) && c=$l; (( c < 5 )) && c=5; echo $c
}
C=configs/h200_3b.yaml; L=$OUT/logs; mkdir -p $L
PARTS=${PARTS:-speed curves tp2 pp2}
has() { [[ " $PARTS " == *" $1 "* ]]; }
MIN_DIM=${MIN_DIM:-4096}
FP8="--set parallel.fp8=current --set parallel.fp8_backend=torch"
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
lane0() {
  if has speed; then
    CUDA_VISIBLE_DEVICES=0 timeout $(within ${SPEED_S:-210} $P1) python3 tools/bench_fp8.py --config $C \
      --set data.batch_size=${SPEED_B:-16} --steps 5 --warmup 2 --set train.param_dtype=bf16 --json $OUT/speed.json \
      --variants "${SPEED_VARIANTS:-local:off,torch:current:2048@parallel.fp8_fast_accum=false,torch:current:2048,torch:current:4096}" \
      --trace /tmp/speed_trace --trace-variants ${TRACE_VARIANTS:-0,2} > $L/speed.log 2>&1; el "speed done"
  fi
  if has layers; then
    CUDA_VISIBLE_DEVICES=0 timeout $(within ${LAYERS_S:-30} $P1) python3 tools/bench_fp8_layers.py --config $C \
      --blocks vlm,flow --warmup 3 --reps 10 --json $OUT/layers.json > $L/layers.log 2>&1; el "layers done"
  fi
  if has probe; then
    CUDA_VISIBLE_DEVICES=0 timeout $(within ${PROBE_S:-60} $P1) python3 tools/device/fp8_cast_probe.py --cols ${PROBE_COLS:-4096} --reps 10 \
      > $L/probe.log 2>&1; el "probe done"
  fi
}
curve() {  # curve NAME FP8 MIN_DIM: one 300-step run on GPU 1 (GPU 0 on a one-GPU machine)
  CUDA_VISIBLE_DEVICES=$(( NGPU - 1 )) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    timeout $(within ${CURVE_S:-210} $P1) python3 -m megaflow.cli train --config $C --set data.batch_size=${CURVE_B:-4} \
    --set train.steps=300 --set train.warmup=20 --set train.log_every=1 --set train.save_every=-1 \
    --set train.dataset_limit=20000 --set data.num_workers=4 --set train.param_dtype=bf16 \
    --set parallel.fp8=$2 --set parallel.fp8_backend=torch --set parallel.fp8_min_dim=${3:-2048} \
    --set train.out_dir=/tmp/curve_$1 2>&1 | tr '\r' '\n' | grep -v overflow > $L/curve_$1.log
  el "curve $1 done"; grep -E "Error|Traceback" $L/curve_$1.log | head -3
}
lane1() {
  has curves || return 0
  local runs=(${CURVES:-bf16:off fp8_$MIN_DIM:current:$MIN_DIM}) r
  for r in "${runs[@]}"; do IFS=: read -r n f d <<< "$r"; curve $n $f $d & done; wait
  local ref=${runs[0]%%:*}
  for r in "${runs[@]:1}"; do
    python3 tools/device/fp8_curves.py /tmp/curve_$ref/tb /tmp/curve_${r%%:*}/tb > $L/curves_${r%%:*}.txt 2>&1
  done
}
if [ "$NGPU" -ge 2 ]; then lane0 & lane1; wait; else lane0; lane1; fi
el "phase 1 done"
if has tp2 && [ "$NGPU" -ge 2 ]; then
  timeout $(within ${TP_S:-110} $TOTAL) torchrun --nproc_per_node 2 tools/bench_scaling.py --config $C --rows ${TP_B:-8} \
    --set train.param_dtype=bf16 --steps 4 --warmup 2 --profile 0 --json $OUT/tp2.json \
    --modes "tp2,tp2@parallel.fp8=current;parallel.fp8_backend=torch;parallel.fp8_min_dim=$MIN_DIM" > $L/tp2.log 2>&1
  el "tp2 done"
fi
pp2() {  # pp2 NAME CAP EXTRA...: PP2 with FP8 (MIN_DIM), 4 micro-batches, full activation checkpointing, 50 steps
  local name=$1 cap=$2; shift 2
  timeout $(within $cap $TOTAL) torchrun --nproc_per_node 2 -m megaflow.cli train --config $C --set parallel.pp=2 \
    --set parallel.micro_batches=4 --set train.param_dtype=bf16 $FP8 --set parallel.fp8_min_dim=$MIN_DIM \
    --set train.activation_checkpointing=full --set train.steps=50 --set train.warmup=5 --set train.log_every=5 \
    --set train.save_every=-1 --set train.dataset_limit=20000 --set data.num_workers=4 --set train.out_dir=/tmp/$name \
    "$@" 2>&1 | tr '\r' '\n' | grep -v overflow > $L/$name.log
  el "$name done"
}
if [ "$NGPU" -ge 2 ]; then
  has pp2 && pp2 pp2_fp8 ${PP2_S:-90} --set data.batch_size=8
  has pp2s && pp2 pp2s_fp8 ${PP2S_S:-150} --set data.batch_size=4 --set train.compile=off
fi
# the summary (output_tail keeps the last 12,000 characters)
if has speed; then
  grep -E "^profile:|step time|GPU kernel time by category" $L/speed.log
  grep -A6 "^variant" $L/speed.log; grep -E "failed|Error" $L/speed.log | head -5
  for d in /tmp/speed_trace/*/; do echo "== top kernels, variant ${d%/}"; head -14 $d/top_kernels.txt 2>/dev/null; done
  for d in /tmp/speed_trace/*/; do cp $d/top_kernels.txt $L/top_kernels_$(basename $d).txt 2>/dev/null; done
fi
has probe && grep -vE "^W1|^ *$" $L/probe.log | tail -16
has layers && grep -vE "^W1|^ *$" $L/layers.log | tail -8
if has curves; then
  for f in $L/curves_*.txt; do echo "== $f"; cat $f; done
  for f in $L/curve_*.log; do echo "== $f"; grep -E "Error|Traceback|OutOfMemory" $f | head -3; done
fi
has tp2 && grep -E "^tp2|Error|error:" $L/tp2.log | head -8
for f in $L/pp2*_fp8.log; do [ -f $f ] && echo "== $f" && grep -iE " step [0-9]+ loss|Error|Traceback" $f | tail -12; done
tar czf $OUT/fp8_logs.tgz -C $OUT logs && rm -rf $L
el total
