#!/usr/bin/env bash
# Issue 19 on a lent nvidia-h200-x2, in the call that installs Transformer Engine (or right after it,
# with PYTHONPATH=$HOME/te/site): docs/benchmarks.md "FP8 at scale" holds the figures. Carry .whl
# (mosaicml-streaming and its compression libs) and .fmnist inside this checkout copy.
#  GPU 0: FP8 vs BF16 step time of configs/h200_3b.yaml (tools/bench_fp8.py), then the BF16 loss curve;
#  GPU 1: per-layer FP8 overhead vs GEMM gain (tools/bench_fp8_layers.py), then the FP8 loss curve
#         (300 steps of real Fashion-MNIST documents, 4 x 1024 tokens a step, same seed);
#  both: TP2 TE layers vs TP1 (tools/bench_tp.py --check) and TP2 FP8 vs BF16 speed; PP2 FP8 (with
#         full activation checkpointing) 50 steps of real data.
# PART=speed (no data: bench_fp8, layers, TP2 rows; fits beside TE's last part in one call) /
# PART=data (the loss curves and PP2: needs .whl and .fmnist) / PART=all. Logs under $OUT.
. tools/device/setup.sh
export PYTHONPATH="$PYTHONPATH:$HOME/te/site"
mkdir -p /tmp/data_cache && ln -sfn /tmp/data_cache data_cache
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
C=configs/h200_3b.yaml
curve() {  # curve GPU FP8 NAME (CURVE_B rows of 1024 tokens a step)
  CUDA_VISIBLE_DEVICES=$1 timeout ${CURVE_S:-300} python3 -m megaflow.cli train --config $C --set data.batch_size=${CURVE_B:-4} \
    --set train.steps=300 --set train.warmup=20 --set train.log_every=10 --set train.save_every=-1 \
    --set data.num_workers=4 --set train.param_dtype=bf16 --set parallel.backend=te --set parallel.fp8=$2 --set train.out_dir=/tmp/curve_$3 \
    2>&1 | tr '\r' '\n' | grep -v overflow > $OUT/curve_$3.log
  el "curve $3 done"
}
if [ "${PART:-all}" != data ]; then
  ( CUDA_VISIBLE_DEVICES=0 timeout 240 python3 tools/bench_fp8.py --config $C --set data.batch_size=8 --steps 5 --warmup 2 \
      --variants local:off,te:off,te:delayed,te:current --set train.param_dtype=bf16 --json $OUT/bench_fp8_3b.json > $OUT/bench_fp8_3b.log 2>&1
    el "bench_fp8 3B done" ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout 120 python3 tools/bench_fp8_layers.py --config $C --json $OUT/layers.json > $OUT/layers.log 2>&1
    el "layers done" ) &
  wait
  tail -9 $OUT/bench_fp8_3b.log; cat $OUT/layers.log | tail -16
  timeout 200 torchrun --nproc_per_node 2 tools/bench_tp.py --config $C --set data.batch_size=8 --backend te --check \
    --tol 2e-3 --fp8 delayed --steps 5 --warmup 2 --json $OUT/tp2.json > $OUT/tp2.log 2>&1; el "tp2 done"; tail -12 $OUT/tp2.log
fi
if [ "${PART:-all}" != speed ]; then
  curve 0 off bf16 & curve 1 delayed fp8 & wait
  python3 - <<'PY'
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import glob
c = {}
for n in ("bf16", "fp8"):
    try:
        ea = EventAccumulator(glob.glob(f"/tmp/curve_{n}/tb")[0]); ea.Reload()
        c[n] = {e.step: e.value for e in ea.Scalars("train/loss")}
        st = [e.value for e in ea.Scalars("perf/step_s")]
        print(n, "median step s", sorted(st)[len(st) // 2], "points", len(c[n]))
    except Exception as e:
        print(n, "no curve:", e)
if len(c) == 2:
    worst = 0
    for s in sorted(set(c["bf16"]) & set(c["fp8"])):
        d = (c["fp8"][s] - c["bf16"][s]) / abs(c["bf16"][s]); worst = max(worst, abs(d) if s >= 50 else 0)
        print(f"step {s:4d} bf16 {c['bf16'][s]:.4f} fp8 {c['fp8'][s]:.4f} rel {d:+.4f}")
    print(f"max |rel diff| from step 50: {worst:.4f}")
    for a in range(0, 300, 50):  # 50-step windows: the mean losses
        w = [s for s in c["bf16"] if a < s <= a + 50 and s in c["fp8"]]
        if w:
            mb, mf = (sum(c[n][s] for s in w) / len(w) for n in ("bf16", "fp8"))
            print(f"steps {a + 1:3d}-{a + 50:3d}: bf16 {mb:.4f} fp8 {mf:.4f} rel {(mf - mb) / abs(mb):+.4f}")
PY
  timeout 200 torchrun --nproc_per_node 2 -m megaflow.cli train --config $C --set parallel.pp=2 --set parallel.micro_batches=4 \
    --set data.batch_size=8 --set train.param_dtype=bf16 --set parallel.backend=te --set parallel.fp8=delayed --set train.activation_checkpointing=full \
    --set train.steps=50 --set train.warmup=5 --set train.log_every=5 --set train.save_every=-1 --set data.num_workers=4 \
    --set train.out_dir=/tmp/pp2_fp8 2>&1 | tr '\r' '\n' | grep -v overflow > $OUT/pp2_fp8.log; el "pp2 done"
  grep -iE "loss|error|Traceback" $OUT/pp2_fp8.log | tail -14
fi
el total
