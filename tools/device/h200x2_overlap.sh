#!/usr/bin/env bash
# Issue 17 on a lent nvidia-h200-x2: one GPU vs DP2 / TP2 / TP2+SP / PP2 (8 micro-batches) at
# configs/h200_1b.yaml with a per-rank breakdown (compute, exposed collective, pipeline wait, idle).
#   bash tools/device/h200x2_overlap.sh profile        # call 1: what makes each layout slow
#   bash tools/device/h200x2_overlap.sh compare BASE   # before (the tree at BASE) / after, one call
#   bash tools/device/h200x2_overlap.sh diagnose       # collective bandwidth, costliest kernels of TP2 / DP2,
#                                                      # compiled TP2 / TP2+SP losses against eager TP2
#   bash tools/device/h200x2_overlap.sh async          # async TP (parallel.async_tp, inductor's micro-pipeline
#                                                      # TP) vs plain TP2+SP (the code before it: async_tp=false)
#                                                      # and TP2, one tree; where TP2's host waits come from
# Results: $OUT/*.json and the tables on stdout; per-rank traces stay on the machine (/tmp/traces).
. tools/device/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
T0=$(date +%s)
bench() {  # tree, json name, modes, timeout
  (cd "$1" && PYTHONPATH=$PWD timeout "$4" torchrun --nproc_per_node 2 tools/bench_scaling.py \
     --config configs/h200_1b.yaml --rows 8 --micro-batches 8 --steps ${STEPS:-5} --warmup ${WARMUP:-2} \
     --profile ${PROFILE:-1} --profile-rows "${PROFILE_ROWS:-}" ${EXTRA:-} --trace "${TRACE-/tmp/traces/$2}" --json $OUT/$2.json --modes "$3" 2>&1 \
     | grep -v "Warning\|warn(" | tee $OUT/$2.txt)
  echo "== $2 done at $(( $(date +%s) - T0 )) s"
}
case "$1" in
diagnose)  # one_mb at 1 micro-batch: the ParallelEngine's own cost against PlainEngine's (one), same work
  TRACE= STEPS=3 PROFILE_ROWS=tp2,dp2,one_mb EXTRA="--top 22 --comm-probe --micro-batches 1" bench . diagnose \
    "one,one_mb,dp2,tp2,tp2@train.compile=on,tp2sp@train.compile=on" 170
  ;;
profile)
  bench . profile "one@train.compile=off,tp2,tp2sp,one,dp2,one_mb,pp2,tp2@train.compile=on,tp2sp@train.compile=on" 220
  ;;
async)  # one call: the baseline, async TP+SP first (the new row), TP2, plain TP2+SP; the TP rows profiled with
  # the sources of their host waits and copies (--top). ASYNC_S: the time limit (the call's budget less the start).
  # Dynamo's graph breaks and recompiles are logged: compiled TP2+SP ran 658 dynamo cache lookups and 234
  # compiled-function calls a step on 2 H200s, against 4 of each on the CPU (docs/benchmarks.md, round 3)
  export TORCH_LOGS=${TORCH_LOGS-graph_breaks,recompiles}
  TRACE= STEPS=3 WARMUP=1 PROFILE_ROWS=tp2,tp2sp EXTRA="--top ${TOP:-12}" bench . async \
    "${ROWS:-one,tp2sp@parallel.async_tp=true,tp2,tp2sp}" ${ASYNC_S:-165}
  ;;
compare)  # BASE: the tree before (session 5: git archive 6b0e4c2), run with this tree's bench script;
  # its eager TP rows first, before any compiled row turned its FlexAttention eager (masks.py)
  cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
  TRACE= STEPS=3 WARMUP=1 PROFILE=0 bench "$2" before "${BEFORE:-tp2,dp2,pp2}" ${BEFORE_S:-150}
  TRACE= STEPS=3 WARMUP=1 PROFILE_ROWS=tp2 EXTRA="--top 12" bench . after "${AFTER:-one,dp2,tp2,tp2sp,one_mb,pp2}" ${AFTER_S:-240}
  ;;
esac
