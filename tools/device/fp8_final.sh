#!/usr/bin/env bash
# Issue 19, round 3 (helper fp8c), one call on an nvidia-h200-x2, every part under its own limit, the
# most important first. docs/benchmarks.md "FP8 on torch._scaled_mm, round 3" holds the figures.
#  pp2     both GPUs: PP2 with torch FP8 (h200_1b, its width-2048 VLM linears), eager, real packed
#          Fashion-MNIST (.fm1b, step13's shards), 4 micro-batches, 50 steps, the loss at every step PP2_S=75
#          (ran all 50 steps only with pp3's first-step fix of the pipeline on NCCL, commit 983289f)
#  speed   GPU 0 and GPU 1 side by side, each its own process with its own BF16 row first:
#          ~3B config, synthetic 16 x 1024 tokens, compiled (tools/bench_fp8.py): FP8 on the VLM blocks
#          (fp8_min_dim 4096) with x's transposed copy split from the norm (fp8_split_transpose), without
#          it, with inductor's prefer_nd_tiling, and the VLM + flow blocks (2048); one profiled step of
#          the split variant (the top kernels: which kernels the split changed)                      SPEED_S=130
#  curves  300 steps of real Fashion-MNIST, BF16 alone on GPU 0 and FP8 (VLM blocks, split transpose)
#          alone on GPU 1, the command and seed of rounds 1-2; then tools/device/fp8_curves.py
#          (the time left until TOTAL_S=335 s after the start, at most CURVE_MAX_S=200)
# Carry .whl (mosaicml-streaming), .fmnist (raw Fashion-MNIST) and .fm1b in this checkout copy.
# Usage on the device: [PARTS="pp2 speed curves"] bash tools/device/fp8_final.sh   (logs: $OUT/fp8c_logs.tgz)
. tools/device/setup.sh
mkdir -p /tmp/data_cache && ln -sfn /tmp/data_cache data_cache
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
left() { echo $(( ${TOTAL_S:-335} - $(date +%s) + T0 - 12 )); }  # seconds to the call's end, less the summary's
C=configs/h200_3b.yaml; L=$OUT/logs; mkdir -p $L
PARTS=${PARTS:-pp2 speed curves}
has() { [[ " $PARTS " == *" $1 "* ]]; }
quiet() { tr '\r' '\n' | grep --line-buffered -v "Warning\|warn\|overflow\|^ *$\|^W1\|^DEBUG"; }
FP8="--set parallel.fp8=current --set parallel.fp8_backend=torch"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
if has pp2; then
  timeout ${PP2_S:-75} torchrun --nproc_per_node 2 -m megaflow.cli train --config configs/h200_1b.yaml --set parallel.pp=2 \
    --set parallel.micro_batches=4 --set data.batch_size=8 --set train.param_dtype=bf16 --set train.compile=off \
    $FP8 --set parallel.fp8_min_dim=2048 --set data.local=.fm1b/train --set data.tokenizer.path=.fm1b/tokenizer.model \
    --set train.dataset_limit=8000 --set data.num_workers=4 --set train.steps=50 --set train.warmup=5 \
    --set train.log_every=1 --set train.save_every=-1 --set train.out_dir=/tmp/pp2_fp8 2>&1 | quiet > $L/pp2.log
  el "pp2 done"; grep -E "FP8|Error|error" $L/pp2.log | head -4
  grep -E " step [0-9]+ loss" $L/pp2.log | awk '{for(i=1;i<NF;i++) if($i=="step") s=$(i+1); if(s==1||s%5==0) print}' \
    | sed 's/real tokens.*//' | tail -12
fi
speed() {  # speed GPU NAME VARIANTS [TRACE ARGS]
  CUDA_VISIBLE_DEVICES=$1 timeout ${SPEED_S:-130} python3 tools/bench_fp8.py --config $C --set data.batch_size=16 \
    --steps 5 --warmup 2 --set train.param_dtype=bf16 --json $OUT/speed_$2.json --variants "$3" ${@:4} 2>&1 | quiet > $L/speed_$2.log
}
if has speed; then
  S="parallel.fp8_split_transpose=true"
  speed 0 gpu0 "local:off,torch:current:4096@$S,torch:current:4096" --trace /tmp/trace --trace-variants 1 &
  speed 1 gpu1 "local:off,torch:current:4096@$S;inductor.triton.prefer_nd_tiling=true,torch:current:2048@$S" &
  wait; el "speed done"
  for g in gpu0 gpu1; do echo "== speed $g"; grep -E "^== variant|step time|tokens/s  |peak memory|failed|Error" $L/speed_$g.log
    grep -A5 "^variant " $L/speed_$g.log; done
  grep "GPU kernel time by category" $L/speed_gpu0.log; head -16 /tmp/trace/1/top_kernels.txt 2>/dev/null
  cp /tmp/trace/1/top_kernels.txt $L/ 2>/dev/null
fi
curve() {  # curve GPU NAME FP8 EXTRA...: one 300-step run alone on its GPU
  local gpu=$1 name=$2 fp8=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout $CURVE_S python3 -m megaflow.cli \
    train --config $C --set data.batch_size=4 --set train.steps=300 --set train.warmup=20 --set train.log_every=1 \
    --set train.save_every=-1 --set train.dataset_limit=20000 --set data.num_workers=4 --set train.param_dtype=bf16 \
    --set parallel.fp8=$fp8 --set parallel.fp8_backend=torch --set parallel.fp8_min_dim=4096 \
    --set train.out_dir=/tmp/curve_$name "$@" 2>&1 | quiet > $L/curve_$name.log
  el "curve $name done"
}
if has curves; then
  CURVE_S=$(left); (( CURVE_S > ${CURVE_MAX_S:-200} )) && CURVE_S=${CURVE_MAX_S:-200}; el "curves: $CURVE_S s"
  curve 0 bf16 off & curve 1 fp8 current --set parallel.fp8_split_transpose=true & wait
  for n in bf16 fp8; do echo "== curve $n"; grep -E "Error|Traceback|OutOfMemory" $L/curve_$n.log | head -3
    grep -E " step [0-9]+ loss" $L/curve_$n.log | tail -1; done
  python3 tools/device/fp8_curves.py /tmp/curve_bf16/tb /tmp/curve_fp8/tb 2>&1 | tee $L/curves.txt
fi
tar czf $OUT/fp8c_logs.tgz -C $OUT logs && rm -rf $L
el total
