#!/usr/bin/env bash
# Issue 17's TP rows on a lent nvidia-h200-x2: one GPU vs TP2 / TP2+SP, plain and with parallel.async_tp,
# configs/h200_1b.yaml, 8 x 1024 tokens (tools/bench_scaling.py), compiled; dynamo's graph breaks and
# recompiles and inductor's micro-pipeline TP messages counted; a per-rank profile of the async rows.
#   bash tools/device/h200x2_tp.sh probe          # call 1: the rows of this tree + a collective probe
#   bash tools/device/h200x2_tp.sh final BASE     # call 2: the tree at BASE (before) and this tree (after)
#   NOCACHE=1 bash tools/device/h200x2_tp.sh graph  # TP2 and one GPU, each without and with the step as one CUDA graph:
#                                   # 5 timed steps after 3 (2 eager + the capture); a 3-line SUMMARY
#   NOCACHE=1 bash tools/device/h200x2_tp.sh graphed BASE  # round 5: this tree's graphed TP2 / TP2+SP rows (NCCL and
#                                   # tp_all_reduce=symm, one graphed step profiled per rank) and the graphed one GPU,
#                                   # then the tree at BASE's graphed TP2 / TP2+SP (before); SUMMARY lines from the logs
#   NOCACHE=1 CACHE=DIR bash tools/device/h200x2_tp.sh round6 BASE  # round 6: the flat AdamW and batch chunks (tp_overlap)
#   NOCACHE=1 LIMIT=100 WAIT=62 bash tools/device/h200x2_tp.sh round7 BASE  # round 7: tp_overlap both ways, tp_comm_reorder
# Env: ROWS / BEFORE / AFTER (rows), S / BEFORE_S / AFTER_S (time limits, s). The inductor cache is
# written to $OUT/inductor.tgz.aa, .ab, ... (15 MB parts, 45 MB at most) and read back from
# $CACHE/inductor.tgz.* (CACHE=.cache unless set; copy the parts there and carry them in the next call): a warm cache turns each
# row's cold compile (~30 s) into a load. Logs: $OUT/*.log and $OUT/logs.tgz; a summary on stdout.
. tools/device/setup.sh
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
ls ${CACHE:-.cache}/inductor.tgz.* >/dev/null 2>&1 && cat ${CACHE:-.cache}/inductor.tgz.* | tar xz -C /tmp && echo "inductor cache: $(du -sh /tmp/inductor | cut -f1) restored"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
T0=$(date +%s)
bench() {  # tree, name, rows, limit, extra args
  (cd "$1" && TORCH_LOGS=graph_breaks,recompiles PYTHONPATH=$PWD timeout "$4" torchrun --nproc_per_node 2 \
     tools/bench_scaling.py --config configs/h200_1b.yaml --rows 8 --steps ${STEPS:-3} --warmup ${WARMUP:-1} \
     --profile 1 --profile-rows "${PROFILE_ROWS:-}" $5 --json $OUT/$2.json --modes "$3" > $OUT/$2.log 2>&1)
  echo "== $2 ($3) done at $(( $(date +%s) - T0 )) s: graph breaks $(grep -c 'Graph break' $OUT/$2.log)," \
       "recompiles $(grep -c 'Recompiling' $OUT/$2.log), 'found no matching' $(grep -c 'found no matching' $OUT/$2.log)"
  grep -a "step .* ms, first loss\|failed:\|Error\|error:" $OUT/$2.log | grep -v Warning | head -20
  grep -a -A12 "^| row" $OUT/$2.log | head -40
  grep -a -m3 -B2 -A8 "Graph break" $OUT/$2.log | cut -c1-300 | head -30
}
summary_profiles() {  # the per-rank breakdown tables of the rows profiled
  grep -a -B1 -A4 "^| rank |" $OUT/$1.log | head -40
}
case "$1" in
probe)
  python3 - <<'EOF' 2>&1 | tee $OUT/env.log
import inspect, torch
import torch._inductor.fx_passes.micro_pipeline_tp as m
src = inspect.getsource(m)
open("/tmp/mptp.py", "w").write(src)
print("micro_pipeline_tp.py:", len(src), "chars; slice/cat matcher:", "_match_slice_cat_all_gather" in src,
      "; split_targets:", "split_targets" in src)
print("symm_mem ops:", sorted(n for n in dir(torch.ops.symm_mem) if "reduce" in n or "fused" in n)[:30])
EOF
  cp /tmp/mptp.py $OUT/micro_pipeline_tp_211.py  # torch 2.11's pass, for the record (in logs.tgz)
  timeout 40 torchrun --nproc_per_node 2 tools/device/tp_comm_probe.py 2>&1 | grep -v "Warning\|warn(" | tee -a $OUT/env.log
  PROFILE_ROWS="tp2@parallel.async_tp=true;parallel.tp_all_reduce=symm,tp2sp@parallel.async_tp=true" \
    bench . probe "${ROWS:-tp2@parallel.async_tp=true;parallel.tp_all_reduce=symm,tp2sp@parallel.async_tp=true,tp2@parallel.async_tp=true,tp2sp,tp2,one}" ${S:-150}
  summary_profiles probe
  ;;
final)  # BASE: the tree before (git archive 820d653), run with this tree's bench script
  cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
  PROFILE_ROWS=none bench "$2" before "${BEFORE:-tp2,tp2sp}" ${BEFORE_S:-70}
  PROFILE_ROWS="${PROFILE_ROWS_AFTER:-tp2@parallel.async_tp=true,tp2sp@parallel.async_tp=true}" \
    bench . after "${AFTER:-one,tp2,tp2@parallel.async_tp=true,tp2sp,tp2sp@parallel.async_tp=true}" ${AFTER_S:-150}
  summary_profiles after
  ;;
graph)  # issue 17's TP2 row as one CUDA graph a step; the graph row's last loss must equal eager tp2's (same steps)
  STEPS=${STEPS:-5} WARMUP=${WARMUP:-3} PROFILE_ROWS=none bench . graph "${ROWS:-tp2@train.step_graph=off,tp2@train.step_graph=on,one@train.step_graph=off,one}" ${S:-62}
  [ -f $OUT/graph.json ] || echo "SUMMARY: no $OUT/graph.json (the time limit?): the row lines above are what ran"
  [ -f $OUT/graph.json ] && python3 - "$OUT/graph.json" <<'EOF'
import json, sys
rows = {r["mode"]: r for r in json.load(open(sys.argv[1]))["rows"]}
# `one` runs h200_1b's default (train.step_graph=auto: graphed), the efficiencies' baseline; one@...=off beside it
one, one_eager = rows.get("one"), rows.get("one@train.step_graph=off")
eager, graph = rows.get("tp2@train.step_graph=off"), rows.get("tp2@train.step_graph=on")
if one and one_eager:
    print(f"SUMMARY one GPU: {one['step_s'] * 1e3:.1f} ms graphed (the baseline), {one_eager['step_s'] * 1e3:.1f} ms without")
for name, r in (("tp2 eager", eager), ("tp2 graph", graph)):
    if r:
        eff = f"{r['efficiency']:.1%} of one GPU's {one['step_s'] * 1e3:.1f} ms" if "efficiency" in r else "no one-GPU row"
        if one_eager:
            eff += f"; {one_eager['step_s'] / (2 * r['step_s']):.1%} of the ungraphed one's"
        print(f"SUMMARY {name}: {r['step_s'] * 1e3:.1f} ms a step ({eff}); first loss {r['loss0']:.4f}, loss after "
              f"the timed steps {r['loss']:.4f}; peak reserved {max(x['reserved_GiB'] for x in r['ranks']):.1f} GiB; "
              f"graphed {r['graphed']}")
if eager and graph:
    print(f"SUMMARY graph vs eager: {eager['step_s'] / graph['step_s']:.2f}x faster; last losses differ by "
          f"{abs(graph['loss'] - eager['loss']) / abs(eager['loss']):.1e} (relative; bf16 rounding ~1e-3), the loss "
          f"fell by {eager['loss0'] - eager['loss']:.4f} eager and {graph['loss0'] - graph['loss']:.4f} graphed")
EOF
  ;;
round7)  # issue 17 round 7 (helper tp5): tp_overlap's chunks in both directions and the inductor collective passes
  # (parallel.tp_comm_reorder) against BASE (5625c63: attention split, forward only, inductor's default order)
  G="train.step_graph=on"; O="parallel.tp_overlap"
  R="parallel.tp_comm_reorder=on"  # plain TP reorders only when asked (auto: with tp_overlap)
  ROWS=${ROWS:-"a:tp2@$G;$O=2 a:one b:tp2@$G;$O=2 a:tp2@$G;$R b:tp2@$G a:tp2sp@$G;$R b:tp2sp@$G a:tp2@$G;$O=4"}
  PROFILED=${PROFILED:-"a:tp2@$G;$O=2 a:tp2@$G;$R"}
  ;&
round6)  # issue 17 round 6 (helper tp4): the graphed rows with the flat AdamW (all TP rows of this tree) and batch chunks
  # (parallel.tp_overlap, with async TP's backward all-reduces beside dW), the graphed one GPU, the tree at BASE's tp2
  G="train.step_graph=on"; O="parallel.async_tp=true;parallel.tp_overlap"
  ROWS=${ROWS:-"a:tp2@$G;$O=2 a:one a:tp2@$G;$O=4 a:tp2@$G b:tp2@$G a:tp2sp@$G;parallel.tp_overlap=2 a:tp2sp@$G"}
  PROFILED=${PROFILED:-"a:tp2@$G;$O=2"}
  ;&
graphed)  # issue 17 round 5 (helper tp3): every row its own torchrun, all started together (tools/bench_turns.py:
  # they compile side by side, then take turns on the GPUs in the order listed); rows of this tree (a:) and of
  # BASE (b:, before; its tools/ needs bench_scaling.py and bench_turns.py of this tree); a SUMMARY line as each
  # process ends, the efficiencies at the end; LIMIT s in all (WAIT s at most for every process to compile).
  # (tp_all_reduce=symm is refused under the graph: its graphed TP2 row hung in round 5's first call, spinning
  # the GPUs under every other row's turn.) A row is one process: rows joined by '+' share one; '%VAR=VALUE' sets
  # that process's environment (NCCL reads NCCL_PROTO once per process; call 1's profiles showed NCCL's LL
  # protocol on every TP collective)
  G="train.step_graph=on"; P=NCCL_PROTO=Simple
  ROWS=${ROWS:-"a:tp2@$G%NCCL_DEBUG=INFO%NCCL_DEBUG_SUBSYS=INIT b:tp2@$G a:one+one@train.step_graph=off a:tp2sp@$G b:tp2sp@$G a:tp2@$G%$P a:tp2sp@$G%$P"}
  PROFILED=${PROFILED:-"a:tp2@$G a:tp2sp@$G"}
  [ -f "$2/tools/bench_turns.py" ] || cp tools/bench_scaling.py tools/bench_turns.py "$2/tools/"
  n=$(echo $ROWS | wc -w); i=0
  rm -rf /tmp/turns /tmp/rows; mkdir -p /tmp/turns /tmp/rows
  one_row() {  # tree, name, rows[%VAR=VALUE...]
    local prof=0 rows=${3%%\%*} env=; [ "$rows" != "$3" ] && env=${3#*%} && env=${env//%/ }
    case " $PROFILED " in *" ${2:0:1}:$rows "*) prof=1;; esac
    (cd "$1" && env $env TORCH_LOGS=graph_breaks,recompiles PYTHONPATH=$PWD TORCHINDUCTOR_COMPILE_THREADS=4 \
       timeout $(( ${LIMIT:-138} - $(date +%s) + T1 )) torchrun --master_port $((29600 + i)) --nproc_per_node 2 \
       tools/bench_scaling.py --config configs/h200_1b.yaml --rows 8 --steps 5 --warmup 3 --profile $prof --top 12 \
       --turns /tmp/turns --turns-n $n --turns-order $i --turns-wait ${WAIT:-90} --json /tmp/rows/$2.json \
       --modes "${rows//+/,}" > /tmp/rows/$2.log 2>&1 & echo $! > /tmp/rows/$2.pid
       wait $!)
    echo "$env" > /tmp/rows/$2.env
    if grep -a -q "step .* ms, first loss" /tmp/rows/$2.log; then
      grep -a "step .* ms, first loss" /tmp/rows/$2.log | sed "s|^|SUMMARY $2 at $(( $(date +%s) - T1 )) s ($env): |"
    else echo "SUMMARY $2 [$3]: no row: $(grep -a 'failed:\|Error' /tmp/rows/$2.log | grep -v Warning | head -2 | cut -c1-300)"; fi
  }
  T1=$(date +%s)
  for spec in $ROWS; do
    tree=.; [ "${spec%%:*}" = b ] && tree="$2"
    one_row "$tree" "$( [ "$tree" = . ] && echo after || echo before )$i" "${spec#*:}" & i=$((i + 1))
  done
  # a process's json is its last act; NCCL's teardown can then hang until the limit: stop them once all wrote
  for _ in $(seq ${LIMIT:-138}); do [ $(ls /tmp/rows/*.json 2>/dev/null | wc -l) -ge $n ] && break; sleep 1; done
  sleep 3; for f in /tmp/rows/*.pid; do kill $(cat $f) 2>/dev/null; done
  wait
  # torchrun's workers can outlive the kill (NCCL teardown): in the lead's session-8 call they still held ~17 GiB
  # each on both GPUs when the next part started, which then ran out of memory. Kill them, wait for the memory.
  pkill -9 -f "tools/[b]ench_scaling.py" 2>/dev/null
  for _ in $(seq 30); do [ "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | sort -n | tail -1)" -lt 2000 ] && break; sleep 1; done
  for f in /tmp/rows/after*.log; do grep -a -B1 -A4 "^| rank |" $f | head -12; grep -a -A14 "Name .*Self CUDA" $f | head -16; done
  grep -a -h "NCCL INFO .*via\|NCCL INFO .*nChannels\|NCCL INFO .*comm 0x.*Init COMPLETE" /tmp/rows/after*.log | sort | uniq -c | head -8
  grep -a -c "Graph break" /tmp/rows/*.log | tr '\n' ' '; echo "(graph breaks per row log)"
  tar czf $OUT/rows.tgz -C /tmp rows
  python3 - /tmp/rows <<'EOF'
import json, pathlib, sys
rows = {}  # (tree, row) -> its json row
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    env = (pathlib.Path(sys.argv[1]) / (f.stem + ".env")).read_text().strip()
    for r in json.loads(f.read_text())["rows"]:
        rows["after" if f.name.startswith("after") else "before", r["mode"] + (f" [{env}]" if env else "")] = r
one, eager = rows.get(("after", "one")), rows.get(("after", "one@train.step_graph=off"))  # one GPU graphed / not
for (tree, mode), r in rows.items():
    ms = r["step_s"] * 1e3
    eff = f"; {one['step_s'] / (2 * r['step_s']):.1%} of the graphed one GPU's {one['step_s'] * 1e3:.1f} ms" if one and mode[:3] != "one" else ""
    eff += f", {eager['step_s'] / (2 * r['step_s']):.1%} of the ungraphed one's" if eager and eff else ""
    print(f"SUMMARY {tree:6s} {mode}: {ms:.1f} ms{eff}; first loss {r['loss0']:.4f}, after the timed steps {r['loss']:.4f}; "
          f"reserved {max(x['reserved_GiB'] for x in r['ranks']):.1f} GiB; graphed {r['graphed']}")
EOF
  ;;
esac
mv $OUT/env.log $OUT/micro_pipeline_tp_211.py /tmp/ 2>/dev/null
tar czf $OUT/logs.tgz -C /tmp env.log micro_pipeline_tp_211.py 2>/dev/null
if [ -z "$NOCACHE" ]; then  # NOCACHE=1: the last call, nothing to carry on
  tar czf /tmp/inductor.tgz -C /tmp inductor 2>/dev/null && echo "inductor cache: $(du -sh /tmp/inductor.tgz | cut -f1)"
  if [ $(stat -c %s /tmp/inductor.tgz) -lt 45000000 ]; then split -b 15000000 /tmp/inductor.tgz $OUT/inductor.tgz.
  else echo "(cache over 45 MB: not returned)"; fi
fi
echo "total $(( $(date +%s) - T0 )) s"
