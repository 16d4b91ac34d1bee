#!/usr/bin/env bash
# Session 12 on issue 13's real-data row (one H200). Parts, each its own process and limit:
#   diag    what cuDNN's variable-length attention accepts here (tools/device/cudnn_varlen_diag.py all)
#   tests   the CUDA tests of the flat AdamW kernel and the step graph (TESTS, TEST_K)
#   rows    this tree, one process: VARIANTS (default: `m32=train.moments_dtype=fp32`) then `after=` (the defaults),
#           traced back to back (--trace-loop), then the plain-PyTorch anchors (--baseline: unpacked and packed)
#   synth   this tree's defaults on the synthetic batch (16 one-document rows), its own process
# Usage on the device: PARTS="tests rows synth" bash tools/device/lead12.sh  (P_S T_S R_S S_S: limits in s; STEPS)
# Carries: .whl, .fm1b (real data), .inductor/ (unpacked when present).
. tools/device/setup.sh
OUT=${OUT:-/tmp/lead12_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export CUDA_VISIBLE_DEVICES=0 STEPS=${STEPS:-10}
. tools/device/real_common.sh  # T0, since, PROF, REAL, quiet; the carried inductor cache
diag() {
  timeout ${D_S:-200} python3 tools/device/cudnn_varlen_diag.py all > $OUT/diag.txt 2> $L/diag_err.txt
  since "cuDNN varlen diagnosis"; cut -c1-400 $OUT/diag.txt
}
tests() {
  timeout ${T_S:-120} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/train/test_fast_step.py tests/train/test_bf16_moments.py} \
    -k "${TEST_K:-kernel_equals or moments}" 2>&1 | grep -v "^DEBUG" > $L/tests.txt
  since "CUDA tests"; tail -4 $L/tests.txt; grep -m3 -B2 -A12 "^E " $L/tests.txt | cut -c1-250 | head -40
}
rows() {
  eval "set -- ${VARIANTS:---variant m32=train.moments_dtype=fp32}"
  timeout ${R_S:-300} python3 tools/profile_step.py $PROF $REAL "$@" --variant after= \
    --trace /tmp/trace --trace-loop --trace-steps 3 --baseline --json $OUT/after.json 2>&1 | quiet > $L/after.txt
  since "rows (variants, after traced, anchors)"; grep "^\[\|back to back:\|GPU ms a step\|baseline\|packed\|GPU kernel time\|GPU busy\|Error\|error" $L/after.txt | cut -c1-300
  sed -n '/top kernels/,/trace /p' $L/after.txt | head -32 | cut -c1-160
}
synth() {
  timeout ${S_S:-120} python3 tools/profile_step.py $PROF --variant synth= --json $OUT/synth.json 2>&1 | quiet > $L/synth.txt
  since "synthetic (defaults)"; grep "^\[\|back to back:\|GPU ms a step" $L/synth.txt | cut -c1-260
}
for part in ${PARTS:-tests rows synth}; do $part; done
echo "=== rows"; python3 tools/device/real_rows.py "$OUT" after synth 2>&1 | cut -c1-700
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "all done after $(( $(date +%s) - T0 )) s"
