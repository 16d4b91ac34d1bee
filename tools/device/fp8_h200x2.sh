#!/usr/bin/env bash
# Issue 19 on a lent nvidia-h200-x2, in the call that installs Transformer Engine (or right after it,
# on the same warm machine, with PYTHONPATH=$HOME/te/site): docs/benchmarks.md "FP8 at scale" holds
# the figures. PARTS picks what runs, in this order (default: all of them):
#  speed   GPU 0: FP8 vs BF16 step time of configs/h200_3b.yaml (tools/bench_fp8.py); GPU 1 meanwhile:
#          per-layer FP8 overhead vs GEMM gain (tools/bench_fp8_layers.py)
#  tp      both: TP2 with TE layers vs TP1 (tools/bench_tp.py --check), TP2 / TP2+SP step time in bf16
#          and FP8
#  curves  GPU 0 BF16, GPU 1 FP8 (TE layers both): 300 steps of real Fashion-MNIST documents,
#          CURVE_B x 1024 tokens a step, same seed; then their losses side by side
#  pp2     both: PP2 with FP8 and full activation checkpointing, 50 steps of real data
# curves and pp2 need the data: carry .whl (mosaicml-streaming and its compression libs) and .fmnist
# inside this checkout copy (with TE's last part the call is too big for them: next call). Built here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     mosaicml-streaming==0.13.0 zstd==1.5.7.3 python-snappy==0.7.3 cramjam==2.14.0 Brotli==1.1.0 catalogue==2.0.10
#   mkdir .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/      (Logs under $OUT.)
. tools/device/setup.sh
export PYTHONPATH="$PYTHONPATH:$HOME/te/site"
mkdir -p /tmp/data_cache && ln -sfn /tmp/data_cache data_cache
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
C=configs/h200_3b.yaml
PARTS=${PARTS:-speed tp curves pp2}
has() { [[ " $PARTS " == *" $1 "* ]]; }
curve() {  # curve GPU FP8 NAME
  CUDA_VISIBLE_DEVICES=$1 timeout ${CURVE_S:-240} python3 -m megaflow.cli train --config $C --set data.batch_size=${CURVE_B:-2} \
    --set train.steps=300 --set train.warmup=20 --set train.log_every=10 --set train.save_every=-1 \
    --set data.num_workers=4 --set train.param_dtype=bf16 --set parallel.backend=te --set parallel.fp8=$2 \
    --set train.out_dir=/tmp/curve_$3 2>&1 | tr '\r' '\n' | grep -v overflow > $OUT/curve_$3.log
  el "curve $3 done"
}
if has speed; then
  ( CUDA_VISIBLE_DEVICES=0 timeout 240 python3 tools/bench_fp8.py --config $C --set data.batch_size=8 --steps 5 --warmup 2 \
      --variants local:off,te:off,te:delayed,te:current --set train.param_dtype=bf16 --json $OUT/bench_fp8_3b.json \
      > $OUT/bench_fp8_3b.log 2>&1; el "bench_fp8 3B done" ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 120 python3 tools/bench_fp8_layers.py --config $C --json $OUT/layers.json \
      > $OUT/layers.log 2>&1; el "layers done" ) &
  wait
  tail -9 $OUT/bench_fp8_3b.log; tail -16 $OUT/layers.log
fi
if has tp; then
  timeout 240 torchrun --nproc_per_node 2 tools/bench_tp.py --config $C --set data.batch_size=8 --backend te --check \
    --tol 2e-3 --fp8 delayed --steps 5 --warmup 2 --json $OUT/tp2.json > $OUT/tp2.log 2>&1; el "tp2 done"
  grep -E "^check|^TP|^config|median" $OUT/tp2.log
fi
if has curves; then
  curve 0 off bf16 & curve 1 delayed fp8 & wait
  python3 tools/device/fp8_curves.py /tmp/curve_bf16/tb /tmp/curve_fp8/tb | tee $OUT/curves.txt
fi
if has pp2; then
  timeout 240 torchrun --nproc_per_node 2 -m megaflow.cli train --config $C --set parallel.pp=2 --set parallel.micro_batches=4 \
    --set data.batch_size=8 --set train.param_dtype=bf16 --set parallel.backend=te --set parallel.fp8=delayed \
    --set train.activation_checkpointing=full --set train.steps=50 --set train.warmup=5 --set train.log_every=5 \
    --set train.save_every=-1 --set data.num_workers=4 --set train.out_dir=/tmp/pp2_fp8 2>&1 \
    | tr '\r' '\n' | grep -v overflow > $OUT/pp2_fp8.log; el "pp2 done"
  grep -iE "loss=|error|Traceback" $OUT/pp2_fp8.log | tail -12
fi
el total
