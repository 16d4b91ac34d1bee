#!/usr/bin/env bash
# One call on a lent nvidia-h200: issue 14's sampling benchmarks (docs/benchmarks.md, "Fast sampling"),
# suite by suite, each under its own time limit, every suite's process warmed up first (untimed).
# Arguments: SUITE:SECONDS ... (suites of tools/bench_sampling.py; default tarflow:200 h200_1b:100).
# BASE (optional, environment) is a copy of the code before issue 14 for the "before" rows, made here
# and carried, e.g.  mkdir -p .gpu/base && git archive 874d2f8 | tar -x -C .gpu/base
# Device command: bash tools/device/h200_sampling.sh tarflow:200 h200_1b:100
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
[ $# -gt 0 ] || set -- tarflow:200 h200_1b:100
for spec in "$@"; do
  suite=${spec%%:*} limit=${spec##*:}
  timeout "$limit" python3 tools/bench_sampling.py --suite "$suite" --warmup ${BASE:+--baseline-root "$BASE"} \
    --out "$OUT/$suite.jsonl" > "$OUT/$suite.log" 2>&1
  echo "== $suite (exit $?)"; grep '^{' "$OUT/$suite.log" | cut -c1-420; grep -i 'error\|warn' "$OUT/$suite.log" | head -5
done
