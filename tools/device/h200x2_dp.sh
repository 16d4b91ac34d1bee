#!/usr/bin/env bash
# Issue 17's DP2 row with the step as one CUDA graph (train.step_graph: auto graphs DP2 since this change) on a
# lent nvidia-h200-x2: configs/h200_1b.yaml (0.9B), 8 synthetic rows x 1024 tokens per data-parallel replica, full
# training steps with the fp32 gradient all-reduce (tools/bench_scaling.py), the one-GPU rows in the same run.
#   bash tools/device/h200x2_dp.sh explore        # call 1: one GPU (graphed: the baseline), DP2 graphed (per-rank
#                                                 # profile), DP2 eager, DP2's levers graphed (the buckets' NCCL stream
#                                                 # at high priority, a small last bucket), one GPU without the graph
#   bash tools/device/h200x2_dp.sh compare BASE   # call 2: this tree (after: one GPU graphed and not, DP2 graphed
#                                                 # and not), then the tree at BASE (before: its default, DP2 eager),
#                                                 # then DP2 under NCCL_CTA_POLICY=1 (CTA_S=0: not), and with
#                                                 # AFTER16_S > 0 this tree at the config's 16 rows a replica
#   bash tools/device/h200x2_dp.sh shard BASE     # issue 17 round 6 (parallel.dp_shard_optimizer), one call, the
#                                                 # config's 16 rows a replica (NROWS): this tree's DP2 sharded (first:
#                                                 # the row that matters), one GPU (each process on its own GPU at once:
#                                                 # GPU 0's and GPU 1's steps), DP2 all-reduce; then the tree at BASE
#                                                 # (before: its default, DP2 all-reduce, graphed); SEND_CACHE=1 sends
#                                                 # the inductor cache back (3 parts) for a later call
# ROWS / BEFORE / AFTER / CTA / AFTER16 replace a run's rows; S (explore) / BEFORE_S, AFTER_S, CTA_S, AFTER16_S: each
# run's time limit (s); NROWS: rows per replica (8).
# Steps: WARMUP untimed (3: two eager steps, then the capture) then STEPS timed. Each row prints as it finishes;
# a SUMMARY line per row at the end (efficiency = the graphed one GPU's step / DP2's step: weak scaling).
# CONFIG_ARGS replaces `--config configs/h200_1b.yaml` (a CPU smoke: CONFIG_ARGS="--tiny --device cpu").
# Compiled graphs: /tmp/inductor, restored from $CACHE/inductor.tgz.* (CACHE=.inductor) when carried.
. tools/device/setup.sh
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
if ls "${CACHE:-.inductor}"/inductor.tgz.* >/dev/null 2>&1; then
  cat "${CACHE:-.inductor}"/inductor.tgz.* | tar xzf - -C /tmp && echo "inductor cache: $(du -sh /tmp/inductor | cut -f1) restored"
fi
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader
T0=$(date +%s)
bench() {  # tree, name, rows, time limit (s)
  (cd "$1" && PYTHONPATH=$PWD timeout "$4" torchrun --nproc_per_node 2 tools/bench_scaling.py \
     ${CONFIG_ARGS:---config configs/h200_1b.yaml} --rows "${NROWS:-8}" --steps "${STEPS:-6}" --warmup "${WARMUP:-3}" \
     --profile "${PROFILE:-1}" --profile-rows "${PROFILE_ROWS:-dp2}" --json "$OUT/$2.json" --modes "$3" 2>&1 \
     | grep --line-buffered -v "Warning\|warn(\|^  warnings\|^W1\|^I1" | tee "$OUT/$2.txt" | grep -a --line-buffered "step .* ms, first loss\|failed\|Error\|^| \|per rank")
  echo "== $2 done at $(( $(date +%s) - T0 )) s"
}
summary() {  # name [baseline name]: each row's step, graphed or not, losses, efficiency against the `one` row (of
             # the baseline run's JSON when given: the before tree's DP2 against the after run's one GPU, same call)
  [ -f "$OUT/$1.json" ] || { echo "SUMMARY $1: no JSON (cut by its time limit?): the row lines above are what ran"; return; }
  python3 - "$1" "$OUT/$1.json" "$OUT/${2:-$1}.json" <<'EOF'
import json, os, sys
name, path, base = sys.argv[1:]
rows = json.load(open(path))["rows"]
one = next((r for r in (json.load(open(base))["rows"] if os.path.exists(base) else []) if r["mode"] == "one"), None)
for r in rows:
    eff = f", {one['step_s'] / r['step_s']:.1%} of `one` ({one['step_s'] * 1e3:.1f} ms)" if one and r["gpus"] > 1 else ""
    if one and r["gpus"] > 1:  # against each GPU's own one-GPU step (the two clock differently under the power cap)
        eff += " = " + ", ".join(f"{x['step_s'] / r['step_s']:.1%} of GPU {i}'s" for i, x in enumerate(one["ranks"]))
    if r["mode"] == "one":
        eff = " (per GPU: " + ", ".join(f"GPU {i} {x['step_s'] * 1e3:.1f} ms" for i, x in enumerate(r["ranks"])) + ")"
    print(f"SUMMARY {name} {r['mode']}: {r['step_s'] * 1e3:.1f} ms, graphed {r['graphed']}{eff}; first loss "
          f"{r['loss0']:.4f}, after the timed steps {r['loss']:.4f}; reserved {max(x['reserved_GiB'] for x in r['ranks']):.1f} GiB")
EOF
}
case "$1" in
explore)
  PROFILE_ROWS=${PROFILE_ROWS:-dp2@train.step_graph=on} bench . explore "${ROWS:-one,dp2@train.step_graph=on,dp2@train.step_graph=off,dp2@parallel.dp_comm_priority=true,dp2@parallel.last_bucket_mb=40,one@train.step_graph=off}" "${S:-85}"
  summary explore
  ;;
compare)  # BASE: the tree before (git archive b91a671), run with this tree's bench script and profiler
  cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
  python3 -c "import torch, torch.distributed as dist; print('NCCL', torch.cuda.nccl.version(), '; ProcessGroupNCCL config has cta_policy:', hasattr(dist.ProcessGroupNCCL.Options().config, 'cta_policy'))" 2>&1 | tail -1
  PROFILE=0 bench . after "${AFTER:-one,dp2,dp2@train.step_graph=off,one@train.step_graph=off,dp2@parallel.dp_comm_ctas=16}" "${AFTER_S:-60}"
  PROFILE=0 bench "$2" before "${BEFORE:-dp2}" "${BEFORE_S:-35}"  # the one-GPU baseline: the after run's `one`
  # NCCL's CTA policy (NCCL >= 2.27; process-wide, read once): 1 = EFFICIENCY, the fewest CTAs that keep decent
  # bandwidth, meant for collectives that overlap compute
  [ "${CTA_S:-30}" -gt 0 ] && NCCL_CTA_POLICY=${CTA_POLICY:-1} PROFILE=0 bench . cta "${CTA:-dp2}" "${CTA_S:-30}"
  # the config's own batch (data.batch_size 16 rows a replica): twice the compute over the same gradient bytes
  [ "${AFTER16_S:-0}" -gt 0 ] && NROWS=16 PROFILE=0 bench . after16 "${AFTER16:-dp2,one}" "${AFTER16_S:-0}"
  summary after
  summary before after
  summary cta after
  if [ "${AFTER16_S:-0}" -gt 0 ]; then summary after16; fi
  ;;
shard)  # BASE: the tree before (git archive 5bb1260), run with this tree's bench script and profiler
  cp tools/bench_scaling.py "$2/tools/" && cp parallel/rank_profile.py "$2/parallel/"
  NROWS=${NROWS:-16} PROFILE_ROWS=${PROFILE_ROWS:-dp2@parallel.dp_shard_optimizer=true} bench . after \
    "${AFTER:-dp2@parallel.dp_shard_optimizer=true,one,dp2@parallel.dp_shard_optimizer=off}" "${AFTER_S:-80}"
  [ "${BEFORE_S:-35}" -gt 0 ] && NROWS=${NROWS:-16} PROFILE=0 bench "$2" before "${BEFORE:-dp2}" "${BEFORE_S:-35}"
  summary after
  summary before after
  if [ "${SEND_CACHE:-0}" = 1 ]; then
    tar czf /tmp/inductor.tgz -C /tmp inductor && split -b 15m /tmp/inductor.tgz "$OUT/inductor.tgz."
    echo "inductor cache: $(( $(stat -c %s /tmp/inductor.tgz) / 2**20 )) MiB compressed, sent back"
  fi
  ;;
*) echo "h200x2_dp.sh: say explore, compare BASE or shard BASE"; exit 2 ;;
esac
