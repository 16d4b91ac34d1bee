#!/usr/bin/env bash
# One call on a lent nvidia-h200: issue 14's sampling benchmarks (docs/benchmarks.md, "Fast sampling"):
# TarFlow-only at ml-tarflow's ImageNet-64 shape and the h200_1b model, every row after an untimed
# warm-up in its process. BASE (optional) is a copy of the code before issue 14 for the "before"
# rows, made here and carried, e.g.:
#   mkdir -p .gpu/base && git archive 874d2f8 | tar -x -C .gpu/base       # then carry .gpu/base
# Device command: bash tools/device/h200_sampling.sh [BASE]   (about 6 minutes with BASE)
BASE=${1:-}
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for suite in tarflow h200_1b; do
  timeout 280 python3 tools/bench_sampling.py --suite $suite --warmup ${BASE:+--baseline-root "$BASE"} \
    --out "$OUT/$suite.jsonl" 2>&1 | tee "$OUT/$suite.log" | cut -c1-300
done
