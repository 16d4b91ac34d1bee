#!/usr/bin/env bash
# Issue 19, round 4 (helper fp8d), on an nvidia-h200-x2, every part under its own limit, the most
# important row first; docs/benchmarks.md "FP8 on torch._scaled_mm, round 4" holds the figures.
#  speed   GPU 0 and GPU 1 side by side, each its own process with its own BF16 row first (~3B config,
#          synthetic 16 x 1024 tokens, compiled, tools/bench_fp8.py; the config's fp8_fast_accum and
#          fp8_split_transpose): on both GPUs delayed scaling + dy's split transpose; then on GPU 0
#          round 3's current scaling, on GPU 1 the same + the first/last VLM block in bf16; on a
#          one-GPU machine all of them on GPU 0 (SPEED0 / SPEED1: other variant lists)            SPEED_S=150
#  curves  300-step runs of real Fashion-MNIST (the command and seed of rounds 1-3), all at once, up to two
#          on a GPU (~60 GiB each): CURVE_RUNS="NAME:GPU:SCALING[:a.b=v,c.d=w] ...", the first the
#          reference; then tools/device/fp8_curves.py of each against it                      CURVE_S=170
#  check   (first) megaflow/fp8_kernels.py's one-read cast + cast-transpose: its bytes against torch's cast, eager
#          and compiled, then its GB/s (tools/device/fp8_kernel_check.py); a mismatch ends the call     CHECK_S=90
#  TRACE=I,J  speed also profiles one step of its variants I and J (the top kernels into the logs)
# Carry .whl (mosaicml-streaming) and .fmnist (raw Fashion-MNIST) for `curves`.
# Usage on the device: PARTS="speed" bash tools/device/fp8_delayed.sh   (logs: $OUT/fp8d_logs.tgz)
. tools/device/setup.sh
mkdir -p /tmp/data_cache && ln -sfn /tmp/data_cache data_cache
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
C=configs/h200_3b.yaml; L=$OUT/logs; mkdir -p $L
PARTS=${PARTS:-speed}
has() { [[ " $PARTS " == *" $1 "* ]]; }
quiet() { tr '\r' '\n' | grep --line-buffered -v "Warning\|warn\|overflow\|^ *$\|^W1\|^DEBUG"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
S="parallel.fp8_split_transpose=true"; DY="parallel.fp8_split_dy=true"; ENDS="parallel.fp8_bf16_ends=1"
if has check; then
  timeout ${CHECK_S:-90} python3 tools/device/fp8_kernel_check.py 2>&1 | quiet | tee $L/check.log
  [ "${PIPESTATUS[0]}" = 0 ] || { el "check failed: stop"; tar czf $OUT/fp8d_logs.tgz -C $OUT logs; exit 1; }
  el "check done"
fi
speed() {  # speed GPU NAME VARIANTS
  local tr=(); [ -n "$TRACE" ] && tr=(--trace /tmp/trace_$2 --trace-variants $TRACE)
  CUDA_VISIBLE_DEVICES=$1 timeout ${SPEED_S:-150} python3 tools/bench_fp8.py --config $C --set data.batch_size=16 \
    --steps 5 --warmup 2 --set train.param_dtype=bf16 --json $OUT/speed_$2.json "${tr[@]}" --variants "$3" 2>&1 | quiet | tee $L/speed_$2.log \
    | grep --line-buffered -E "^== variant|step time|back to back|failed"
  for f in /tmp/trace_$2/*/top_kernels.txt; do [ -f $f ] && cp $f $L/top_kernels_$2_$(basename $(dirname $f)).txt; done
  el "speed $2 done"
}
if has speed; then
  A="torch:delayed:4096@$S;$DY"
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    speed 0 gpu0 "${SPEED0:-local:off,$A,torch:current:4096@$S}" &
    speed 1 gpu1 "${SPEED1:-local:off,$A,$A;$ENDS}" &
  else  # one GPU: its rows one after the other
    speed 0 gpu0 "${SPEED0:-local:off,$A,$A;$ENDS,torch:current:4096@$S}" &
  fi
  wait
  for g in gpu0 gpu1; do [ -f $L/speed_$g.log ] || continue; echo "== speed $g"
    grep -E "^== variant|step time|peak memory|failed|Error" $L/speed_$g.log | head -16; grep -A14 "^variant " $L/speed_$g.log; done
fi
curve() {  # curve GPU NAME FP8 EXTRA...: one 300-step run
  local gpu=$1 name=$2 fp8=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${CURVE_S:-170} python3 -m megaflow.cli \
    train --config $C --set data.batch_size=4 --set train.steps=300 --set train.warmup=20 --set train.log_every=1 \
    --set train.save_every=-1 --set train.dataset_limit=20000 --set data.num_workers=4 --set train.param_dtype=bf16 \
    --set parallel.fp8=$fp8 --set parallel.fp8_backend=torch --set parallel.fp8_min_dim=4096 \
    --set train.out_dir=/tmp/curve_$name "$@" 2>&1 | quiet > $L/curve_$name.log
  el "curve $name done"; grep -E "Error|Traceback|OutOfMemory" $L/curve_$name.log | head -3
  grep -E " step [0-9]+ loss" $L/curve_$name.log | tail -1
}
if has curves; then  # CURVE_RUNS: NAME:GPU:SCALING[:a.b=v,c.d=w] ..., the first the reference (BF16)
  RUNS=(${CURVE_RUNS:-bf16:0:off fp8:1:delayed:parallel.fp8_split_dy=true})
  for r in "${RUNS[@]}"; do
    IFS=: read -r name gpu fp8 kvs <<< "$r"; args=()
    for kv in ${kvs//,/ }; do args+=(--set "$kv"); done
    curve $gpu $name $fp8 "${args[@]}" &
  done
  wait
  ref=${RUNS[0]%%:*}
  for r in "${RUNS[@]:1}"; do name=${r%%:*}; echo "== $name vs $ref"
    python3 tools/device/fp8_curves.py /tmp/curve_$ref/tb /tmp/curve_$name/tb 2>&1 | tee $L/curves_$name.txt; done
fi
tar czf $OUT/fp8d_logs.tgz -C $OUT logs && rm -rf $L
el total
