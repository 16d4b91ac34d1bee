#!/usr/bin/env bash
# The lead's merged call of session 8 on a lent nvidia-h200-x2 (issue 17, configs/h200_1b.yaml), most important first,
# each part under its own limit so a cut call keeps what ran:
#   part 1 (S1 s): DP2 at the config's own 16 rows a replica, graphed (train.step_graph: auto), against the graphed
#          one GPU on the same rows, one torchrun (tools/bench_scaling.py; efficiency = one's step / dp2's step);
#   part 2 (S2 s): TP2 / TP2+SP graphed, this tree and BASE_TP (git archive b91a671), one GPU graphed and not, side by
#          side with turns (tools/device/h200x2_tp.sh graphed; LIMIT = S2);
#   part 3 (S3 s): PP2 1F1B and interleaved at 32 rows, 8 micro-batches, against the graphed one GPU on the same rows
#          (tools/device/h200x2_pp.sh final, its before row skipped: b91a671 stalls in its first PP step).
# Carry: .gpu/tp3/.before (BASE_TP), .gpu/tp3/.cache and .gpu/pp3/.inductor (inductor caches).
# Usage: bash tools/device/lead8_check.sh   (S1=85 S2=125 S3=105 by default: ~335 s)
. tools/device/setup.sh
T0=$(date +%s)
since() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
(PYTHONPATH=$PWD timeout "${S1:-85}" torchrun --nproc_per_node 2 tools/bench_scaling.py --config configs/h200_1b.yaml \
   --rows 16 --steps "${STEPS1:-8}" --warmup 3 --profile 0 --json "$OUT/dp16.json" --modes "${ROWS1:-one,dp2}" \
   > "$OUT/dp16.log" 2>&1 &
 tail -F --pid=$! "$OUT/dp16.log" 2>/dev/null | grep --line-buffered -a "step .* ms, first loss\|failed:\|Error\|^| ")
since "part 1 (DP2, 16 rows a replica)"
NOCACHE=1 CACHE=.gpu/tp3/.cache LIMIT="${S2:-125}" bash tools/device/h200x2_tp.sh graphed .gpu/tp3/.before 2>&1 \
  | grep --line-buffered -a "SUMMARY\|Error\|failed"
since "part 2 (TP2 / TP2+SP graphed)"
INDUCTOR_IN=.gpu/pp3/.inductor STEPS=3 BEFORE_S=0 AFTER_S="${S3:-105}" PROFILE_ROWS=pp2 \
  bash tools/device/h200x2_pp.sh final 2>&1 | grep --line-buffered -a "SUMMARY\|Error\|failed\|cut by"
since "part 3 (PP2)"
