#!/usr/bin/env bash
# Issue 13, h200_1b's optimizer-side memory passes (helper grad16): train.bf16_grads on (one flat bf16 gradient
# buffer the linears' weight-gradient GEMMs write into; norm and flat AdamW read bf16) against off (bf16 .grads
# copied into fp32 main gradients), each part its own process and limit, the most important first:
#   real   real packed data (.fm1b, as att14_rows.sh): rows on, off, on again (A/B/A, back to back figures), the last
#          traced (--trace-loop, 3 steps): its kernel list shows the gradient copy and the fp32 norm gone
#   synth  the synthetic batch: rows on, off, the last traced: the old path's kernel list beside it
# Usage on the device: PARTS="real synth" bash tools/device/grad16_rows.sh   (R_S S_S: per-part limits in s; STEPS;
# the first call: real 150 s with a cold compile of the "on" regions; synth needs ~130 s for its two rows)
# Carries: .whl (mosaicml-streaming), .fm1b, .inductor/ (unpacked when present).
. tools/device/setup.sh
OUT=${OUT:-/tmp/grad16_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export CUDA_VISIBLE_DEVICES=0 STEPS=${STEPS:-10}
. tools/device/real_common.sh  # T0, since, PROF, REAL, quiet; the carried inductor cache
ON=train.bf16_grads=on; OFF=train.bf16_grads=off
kernels() { grep -i "optimizer\|copy/cast\|reductions\|elementwise" "$1" | head -14 | cut -c1-170; }  # top_kernels.txt
real() {
  timeout ${R_S:-160} python3 tools/profile_step.py $PROF $REAL --variant on=$ON --variant off=$OFF --variant on2=$ON \
    --trace /tmp/trace_real --trace-loop --trace-steps 3 --json $OUT/real.json 2>&1 | quiet > $L/real.txt
  since "real data (on, off, on2 traced)"; grep "^\[\|back to back:\|GPU ms a step" $L/real.txt | cut -c1-260
  cp /tmp/trace_real/top_ops.txt $L/top_ops_real_on.txt; cp /tmp/trace_real/top_kernels.txt $L/top_kernels_real_on.txt
  kernels $L/top_kernels_real_on.txt
}
synth() {
  timeout ${S_S:-140} python3 tools/profile_step.py $PROF --variant on=$ON --variant off=$OFF \
    --trace /tmp/trace_synth --trace-loop --trace-steps 3 --json $OUT/synth.json 2>&1 | quiet > $L/synth.txt
  since "synthetic (on, off traced)"; grep "^\[\|back to back:\|GPU ms a step" $L/synth.txt | cut -c1-260
  cp /tmp/trace_synth/top_ops.txt $L/top_ops_synth_off.txt; cp /tmp/trace_synth/top_kernels.txt $L/top_kernels_synth_off.txt
  kernels $L/top_kernels_synth_off.txt
}
for part in ${PARTS:-real synth}; do $part; done
echo "=== rows"; python3 tools/device/real_rows.py "$OUT" real synth 2>&1 | cut -c1-700
for f in real synth; do [ -f $L/$f.txt ] && { echo "=== $f (errors)"; grep -i "error\|Traceback\|failed" $L/$f.txt | head -4 | cut -c1-300; }; done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "all done after $(( $(date +%s) - T0 )) s"
