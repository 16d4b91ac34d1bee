#!/usr/bin/env bash
# Issue 13, h200_1b's real-data row (helper att14), one H200, the parts one after the other, each its own process
# and its own limit, the most important first. Real data = packed Fashion-MNIST of h200_1b's mix (.fm1b, 8,000 docs).
#   after     this tree: `--variant after=` (data.prefetch 2: the loader plans, builds and pins ahead in a thread)
#             and `--variant noprefetch=data.prefetch=0` (all of it between two steps, as before; VARIANTS="..."
#             replaces the second: e.g. VARIANTS="b64=model.mask_block=64", att15's 64-token mask blocks), the last
#             with TRACE=1 a torch.profiler trace of 3 steps back to back (top host ops: where the host waits);
#             with ANCHOR=1 the plain-PyTorch Llama anchor after them, in the same process (--baseline)
#   attn      the kernels alone (real13_attn.py: flex128, grouped heads, 64-token blocks with max-autotune tiles)
#   tests     the CUDA gradient test of the document kernels (flex == dense, grouped heads; tests/model/test_masks.py;
#             TESTS="files" TEST_K="expr" pick others)
#   anchor    this tree's synthetic batch + the plain-PyTorch Llama anchor (--baseline)
#   before    `git archive 5625c63` unpacked in before/, its default, the same data
#   probe     attn and tests side by side
# Usage on the device: PARTS="after probe" bash tools/device/att14_rows.sh   (A_S K_S T_S N_S B_S: per-part
# limits in s; STEPS; KERNELS; SAVE_CACHE=1: the inductor cache back in $OUT as inductor.tgz.* for the next call)
# Carries: .whl (mosaicml-streaming), .fm1b, before/ (for "before"), .inductor/ (unpacked when present).
. tools/device/setup.sh
OUT=${OUT:-/tmp/att14_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export CUDA_VISIBLE_DEVICES=0 STEPS=${STEPS:-10}
. tools/device/real_common.sh  # T0, since, PROF, REAL, quiet; the carried inductor cache
after() {
  local v vs="--variant after="; for v in ${VARIANTS:-noprefetch=data.prefetch=0}; do vs="$vs --variant $v"; done
  timeout ${A_S:-80} python3 tools/profile_step.py $PROF $REAL $vs \
    ${TRACE:+--trace /tmp/trace --trace-loop --trace-steps 3} ${ANCHOR:+--baseline} --json $OUT/after.json 2>&1 \
    | quiet > $L/after.txt
  since "after, real data (after, ${VARIANTS:-noprefetch})"; grep "^\[\|back to back:\|GPU ms a step\|baseline" $L/after.txt | cut -c1-260
  cp /tmp/trace/top_host_ops.txt $L/ 2>/dev/null; head -25 /tmp/trace/top_host_ops.txt 2>/dev/null | cut -c1-200
}
attn() {
  timeout ${K_S:-40} python3 tools/device/real13_attn.py --batches 1 --iters 5 --no-shallow --no-build \
    --kernels ${KERNELS:-flex128,flexgqa,flex64at} 2>&1 | quiet > $L/attn.txt
  since "attention kernels"; grep "^{\|AUTOTUNE\|triton_flex" $L/attn.txt | head -40 | cut -c1-900
}
tests() {
  timeout ${T_S:-35} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/model/test_masks.py} -k "${TEST_K:-gradients or groups}" 2>&1 \
    | grep -v "^DEBUG" > $L/tests.txt
  since "CUDA tests"; tail -3 $L/tests.txt
}
anchor() {
  timeout ${N_S:-60} python3 tools/profile_step.py $PROF --baseline --json $OUT/anchor.json 2>&1 | quiet > $L/anchor.txt
  since "synthetic + anchor"; grep "^\[\|baseline\|MFU" $L/anchor.txt | cut -c1-260
}
before() {
  (cd before && PYTHONPATH=$PWD:/tmp/site timeout ${B_S:-55} python3 tools/profile_step.py $PROF $REAL \
    --json $OUT/before.json 2>&1 | quiet > $L/before.txt)
  since "before (5625c63), real data"; grep "MFU\|step time" $L/before.txt | cut -c1-260
}
probe() { attn & tests; wait; }  # the kernels alone and the CUDA tests side by side (short: the limit of the call)
for part in ${PARTS:-after probe}; do $part; done
echo "=== rows"; python3 tools/device/real_rows.py "$OUT" after before anchor 2>&1 | cut -c1-700
for f in after before anchor; do [ -f $L/$f.txt ] && { echo "=== $f (errors)"; grep -i "error\|Traceback\|failed" $L/$f.txt | head -4 | cut -c1-300; }; done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
if [ "${SAVE_CACHE:-0}" = 1 ]; then tar czf - -C /tmp inductor | split -b 15000000 - $OUT/inductor.tgz.; ls -la $OUT; fi
echo "all done after $(( $(date +%s) - T0 )) s"
