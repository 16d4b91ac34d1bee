#!/usr/bin/env bash
# Issue 17's PP2 row on a lent nvidia-h200-x2: configs/h200_1b.yaml (0.9B), RB synthetic rows x 1024 tokens
# (h200_1b's train.step_graph: auto graphs the PP rows since session 9, each rank's whole schedule one CUDA graph;
# `pp2@train.step_graph=off` is the eager schedule)
# (default 32: 4-row micro-batches at m=8, real GPU work each), full training steps (tools/bench_scaling.py),
# PP2 against the plain one-GPU step on the same 32 rows (`one`, graphed: train.step_graph=auto), measured in
# the same run; a per-rank profile of the PP rows (compute / p2p wait = bubble / idle) and dynamo's recompiles.
#   bash tools/device/h200x2_pp.sh final [BASE]   # the merged call (~145 s with compile): this tree's pp2, one,
#                                                 # pp2i, then BASE's pp2 (28 s); SUMMARY lines as rows finish
#   bash tools/device/h200x2_pp.sh probe          # rows pp2 (1F1B), one, pp2i (interleaved, v=2) of this tree
#   bash tools/device/h200x2_pp.sh mb1            # one GPU: one vs one_mb (8 micro-batches accumulated), graphed
#                                                 # and not: PP's ceiling without a bubble, one_mb's top kernels
#   bash tools/device/h200x2_pp.sh fusion         # one GPU: one_mb without / with gradient-accumulation fusion
#                                                 # (parallel.grad_accum_fusion), then one; each row's device
#                                                 # time by kind of kernel (NPROC=2 ROWS=pp2i4@...: the PP rows)
#   bash tools/device/h200x2_pp.sh compare BASE   # this tree's pp2, one, pp2i (after), then BASE's pp2 (before:
#                                                 # git archive 5bb1260 into BASE, run with this tree's bench script)
# Env: ROWS / BEFORE / AFTER (rows), S / BEFORE_S / AFTER_S (time limits, s), RB (rows), TOP (N costliest host
# and device operators of each profiled row), CACHE_OUT=1 (send the inductor cache back as $OUT/inductor.tgz.*,
# 15 MiB parts; carried as .inductor/, or the folder INDUCTOR_IN names, it is unpacked first, so rows compile from
# it in seconds).
# Logs: $OUT/<name>.log (whole), a short summary on stdout as rows finish.
. tools/device/setup.sh
. tools/device/inductor_cache.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$(date +%s)
bench() {  # tree, name, rows, time limit (s)
  (cd "$1" && TORCH_LOGS=recompiles PYTHONPATH=$PWD timeout "$4" torchrun --nproc_per_node "${NPROC:-2}" tools/bench_scaling.py \
     --config configs/h200_1b.yaml --rows "${RB:-32}" --micro-batches 8 --steps "${STEPS:-4}" --warmup "${WARMUP:-3}" \
     --profile 1 --profile-rows "${PROFILE_ROWS-pp2,pp2i}" --top "${TOP:-0}" --json "$OUT/$2.json" --modes "$3" \
     --stacks-after "$(( $4 - 8 ))" \
     > "$OUT/$2.log" 2>&1 &
   tail -F --pid=$! "$OUT/$2.log" 2>/dev/null | grep --line-buffered -a "step .* ms, first loss\|failed:\|Error\|^| \|x , \|MiB\b\|^\[..:..:..\] \|device kernels per step" \
     | sed -u "s/^\([^ []*: step .* ms, first loss\)/SUMMARY $2 \1/")
  pkill -9 -f "tools/[b]ench_scaling.py" && sleep 3  # workers a time limit left behind hold GPU memory (the [b]: not this line)
  echo "== $2 ($3) done at $(( $(date +%s) - T0 )) s; recompiles: $(grep -c 'Recompiling' "$OUT/$2.log")"
  grep -a "Recompiling" "$OUT/$2.log" | cut -c1-240 | sort | uniq -c | head -5
  grep -a -A14 "most recent call first" "$OUT/$2.log" | grep -a "File" | cut -c1-160 | head -24  # --stacks-after
}
summary() {  # SUMMARY lines of a run's log (also of one cut by its limit): each PP row's efficiency against one
  python3 - "$OUT/$1.log" "$1" "$2" <<'PYEOF'
import re, sys
log, name, limit = open(sys.argv[1], errors="replace").read(), sys.argv[2], sys.argv[3]
steps = dict(re.findall(r"^([^ \[]+): step ([0-9.]+) ms, first loss", log, re.M))
for row in [r for r in steps if r.startswith("pp")]:  # pp2, pp2i and their variants (pp2@train.step_graph=off)
    p, inter, v = re.match(r"pp(\d+)(i(\d*))?", row).groups()  # pp2i4: interleaved, 4 chunks a rank
    v = int(v or 2) if inter else 1
    theory = (int(p) - 1) / (v * 8 + int(p) - 1)
    if row in steps and "one" in steps:
        eff = float(steps["one"]) / (2 * float(steps[row]))
        print(f"SUMMARY {name} {row}: {float(steps[row]):.1f} ms vs one GPU {float(steps['one']):.1f} ms on the same rows: "
              f"efficiency {eff:.1%} (target 85%), 1 - efficiency {1 - eff:.3f} vs bubble theory {theory:.3f}", flush=True)
    elif row in steps:
        print(f"SUMMARY {name} {row}: {float(steps[row]):.1f} ms (no one-GPU row finished: no efficiency)")
for row in re.findall(r"\] (\S+): built in", log):
    if row not in steps:
        got = "its first step done, then cut" if re.search(rf"\] {re.escape(row)}: first step", log) else "no step finished (first-step stall or compile)"
        print(f"SUMMARY {name} {row}: cut by the {limit} s limit: {got}")
PYEOF
}
case "$1" in
final)  # the lead's merged call, from the repo root: after = this tree's pp2, one, pp2i; before (if BASE is given
  # and exists: git archive 5bb1260 into BASE) = BASE's pp2 with a short limit: b91a671 stalls in its first step
  bench . after "${AFTER:-pp2,one,pp2i}" "${AFTER_S:-110}"
  summary after "${AFTER_S:-110}"
  if [ -n "${2:-}" ] && [ -d "${2:-}" ] && [ "${BEFORE_S:-28}" -gt 0 ]; then
    cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
    PROFILE_ROWS=none bench "$2" before "${BEFORE:-pp2}" "${BEFORE_S:-28}"
    summary before "${BEFORE_S:-28}"
  fi
  ;;
probe)
  bench . probe "${ROWS:-pp2,one,pp2i}" "${S:-120}"
  ;;
mb1)  # one GPU (a lent nvidia-h200 will do): the plain step on RB rows against the same rows as 8 micro-batches
  # accumulated (one_mb, graphed and not): the GPU work the pipeline's micro-batches add, PP2's ceiling with no
  # bubble (one / one_mb), and one_mb's costliest kernels
  NPROC=1 PROFILE_ROWS=one_mb TOP=${TOP:-12} bench . mb1 "${ROWS:-one,one_mb,one_mb@train.step_graph=off}" "${S:-85}"
  python3 - "$OUT/mb1.log" <<'PYEOF'
import re, sys
steps = dict(re.findall(r"^([^ \[]+): step ([0-9.]+) ms, first loss", open(sys.argv[1], errors="replace").read(), re.M))
for row in [r for r in steps if r.startswith("one_mb")]:
    if "one" in steps:
        print(f"SUMMARY mb1 {row}: {float(steps[row]):.1f} ms vs one {float(steps['one']):.1f} ms: the micro-batches' GPU work "
              f"caps PP2 at {float(steps['one']) / float(steps[row]):.1%} of one GPU with no bubble", flush=True)
PYEOF
  ;;
fusion)  # gradient-accumulation fusion (parallel/wgrad_fusion.py) off, on, and the plain step on the same rows;
  # every row profiled: its device time by kind of kernel, where the micro-batches' extra GPU work goes
  NPROC=${NPROC:-1} PROFILE_ROWS=${PROFILE_ROWS-one,one_mb,pp2,pp2i4} TOP=${TOP:-0} bench . fusion \
    "${ROWS:-one_mb@parallel.grad_accum_fusion=off,one_mb,one}" "${S:-120}"
  python3 - "$OUT/fusion.log" <<'PYEOF'
import re, sys
steps = dict(re.findall(r"^([^ \[]+): step ([0-9.]+) ms, first loss", open(sys.argv[1], errors="replace").read(), re.M))
for row, ms in steps.items():
    ref = "one" if row.startswith("one_mb") else None
    if row.startswith("pp") and "one" in steps:
        print(f"SUMMARY fusion {row}: {float(ms):.1f} ms vs one GPU {float(steps['one']):.1f}: efficiency "
              f"{float(steps['one']) / (2 * float(ms)):.1%} (target 85%)", flush=True)
    elif ref in steps:
        print(f"SUMMARY fusion {row}: {float(ms):.1f} ms vs one {float(steps['one']):.1f} ms: PP2's ceiling with no "
              f"bubble {float(steps['one']) / float(ms):.1%}", flush=True)
PYEOF
  ;;
compare)  # BASE: the tree before, run with this tree's bench script and profiler; after first (the rows that
  # matter most), then before, which finds the after rows' compiled graphs in the inductor cache
  bench . after "${AFTER:-pp2,one,pp2i}" "${AFTER_S:-100}"
  cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
  PROFILE_ROWS=${PROFILE_ROWS_BEFORE-pp2} bench "$2" before "${BEFORE:-pp2}" "${BEFORE_S:-40}"
  ;;
*) echo "h200x2_pp.sh: say final [BASE], probe, mb1 or compare BASE"; exit 2 ;;
esac
if [ -n "${CACHE_OUT:-}" ]; then  # at most 3 parts: 8 files come back, and what is carried must stay under 64 MiB
  send_inductor_cache 45
fi
