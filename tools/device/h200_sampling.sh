#!/usr/bin/env bash
# One call on a lent nvidia-h200: issue 14's sampling benchmarks (docs/benchmarks.md, "Fast sampling"),
# suite by suite, each under its own time limit, every suite's process warmed up first (untimed).
# Arguments: SUITE:SECONDS[:EXTRA] ... (suites of tools/bench_sampling.py; EXTRA: more options, e.g.
# --no-check; default: tarflow:185:--no-check h200_1b:80). BASE (optional, environment) is a copy of
# the code before issue 14 for "before" rows, made here and carried, e.g.
#   mkdir -p .gpu/base && git archive 874d2f8 | tar -x -C .gpu/base
# Device command: bash tools/device/h200_sampling.sh tarflow:185:--no-check h200_1b:80
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
[ $# -gt 0 ] || set -- tarflow:185:--no-check h200_1b:80
for spec in "$@"; do
  IFS=: read -r suite limit extra <<< "$spec"
  timeout "$limit" python3 tools/bench_sampling.py --suite "$suite" --warmup ${BASE:+--baseline-root "$BASE"} \
    --out "$OUT/$suite.jsonl" $extra > "$OUT/$suite.log" 2>&1
  echo "== $suite (exit $?)"; grep '^{' "$OUT/$suite.log" | cut -c1-330
  grep -i 'error\|warn\|traceback' "$OUT/$suite.log" | sort | uniq -c | head -6 | cut -c1-300
done
