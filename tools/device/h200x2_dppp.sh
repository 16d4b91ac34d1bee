#!/usr/bin/env bash
# Issue 17's DP2 and PP2 rows on a lent nvidia-h200-x2: configs/h200_1b.yaml (0.9B), 8 synthetic rows x 1024
# tokens per data-parallel replica, full training steps (tools/bench_scaling.py), one GPU measured in the same run.
#   bash tools/device/h200x2_dppp.sh explore        # DP2's levers as rows of one run (bucket size, the all-reduce's
#                                                   # CTAs, the engine's own cost at one micro-batch) and PP2 (1F1B,
#                                                   # 8 micro-batches) against one_mb; per-rank profiles of dp2 / pp2
#   bash tools/device/h200x2_dppp.sh compare BASE   # before (the tree at BASE, this bench script) / after, one call
# ROWS / BEFORE / AFTER replace a mode's rows; LIMIT (explore) / BEFORE_S, AFTER_S (compare): seconds per run.
# Compiled graphs go to /tmp/inductor. CACHE_OUT=1 sends it back as $OUT/inductor.tgz.* (15 MiB parts); carried
# as .inductor/ in the next call it is unpacked first: the same device image, so inductor's FX-graph and AOT
# caches hit and a row compiles in seconds instead of ~30 s (compile time is never inside the timed steps).
. tools/device/setup.sh
. tools/device/inductor_cache.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$(date +%s)
bench() {  # tree, name, rows, time limit (s)
  (cd "$1" && PYTHONPATH=$PWD timeout "$4" torchrun --nproc_per_node 2 tools/bench_scaling.py \
     --config configs/h200_1b.yaml --rows 8 --micro-batches 8 --steps "${STEPS:-6}" --warmup "${WARMUP:-1}" \
     --profile "${PROFILE:-1}" --profile-rows "${PROFILE_ROWS-dp2,pp2}" --json "$OUT/$2.json" --modes "$3" 2>&1 \
     | grep -v "Warning\|warn(" | tee "$OUT/$2.txt")
  echo "== $2 done at $(( $(date +%s) - T0 )) s"
}
case "$1" in
explore)
  bench . explore \
    "${ROWS:-one,dp2,dp2@parallel.bucket_mb=200,dp2@parallel.dp_comm_ctas=8,one_mb,pp2,pp2i,dp2@parallel.bucket_mb=200;parallel.dp_comm_ctas=8,one_mb@parallel.micro_batches=1}" \
    "${LIMIT:-115}"
  ;;
compare)  # BASE: the tree before (git archive 820d653), run with this tree's bench script and profiler
  cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
  PROFILE=0 bench "$2" before "${BEFORE:-dp2}" "${BEFORE_S:-40}"
  PROFILE_ROWS=${PROFILE_ROWS-dp2,one_mb,pp2} bench . after "${AFTER:-one,dp2,one_mb,pp2}" "${AFTER_S:-100}"
  ;;
*) echo "h200x2_dppp.sh: say explore or compare BASE"; exit 2 ;;
esac
if [ -n "${CACHE_OUT:-}" ]; then  # at most 4 parts: 8 files come back, and what is carried must stay under 64 MiB
  send_inductor_cache 56
fi
