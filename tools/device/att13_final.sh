#!/usr/bin/env bash
# Issue 13, h200_1b's real-data row (helper att13): before / after in one call on nvidia-h200-x2, each its own
# process, real packed Fashion-MNIST (.fm1b = data_cache/fm1b, h200_1b's mix, 8,000 documents).
# GPU 1 (the most important rows first): this tree, `--variant after=` (its defaults: data.packing=fullest,
#   FlexAttention reading the grouped k/v heads in place) and `--variant first_fit=data.packing=first_fit`
#   (the old packing: the same batches as "before", so its losses check the attention change), then the
#   CUDA gradient test of the document kernels (flex == dense, grouped heads; tests/model/test_masks.py),
#   then, in what is left of END_S, the kernels alone (real13_attn.py: flex128, grouped heads, 64-token blocks).
# GPU 0: "before" = `git archive 5bb1260` unpacked in before/ (its default), the same data; then this tree's
#   synthetic batch with the plain-PyTorch anchor (--baseline).
# Carries: .whl (mosaicml-streaming), .fm1b, before/, .inductor/ (unpacked when present).
# Usage on the device: bash tools/device/att13_final.sh   (B_S N_S A_S T_S: per-part limits in s; END_S; STEPS;
# GPUS=1: one GPU, the parts in turn: after, before, anchor, tests)
. tools/device/setup.sh
OUT=${OUT:-/tmp/att13_out}; mkdir -p "$OUT"
. tools/device/real_common.sh  # T0, since, PROF, REAL, quiet; the carried inductor cache
after() {
  timeout ${A_S:-80} python3 tools/profile_step.py $PROF $REAL --variant after= \
    --variant first_fit=data.packing=first_fit --json $OUT/after.json 2>&1 | quiet > $OUT/after.txt
  since "after, real data (fullest, first_fit)"; grep "^\[" $OUT/after.txt
}
cuda_tests() {
  timeout ${T_S:-25} python3 -m pytest -q -p no:cacheprovider tests/model/test_masks.py -k "gradients or groups" 2>&1 \
    | grep -v "^DEBUG" | tail -3 > $OUT/tests.txt
  since "CUDA tests"
}
kernels() {  # in what is left of END_S: the kernels alone
  REM=$(( ${END_S:-100} - ($(date +%s) - T0) ))
  [ $REM -gt 15 ] && timeout $REM python3 tools/device/real13_attn.py --batches 1 --iters 5 --no-shallow --no-build \
    --kernels flex128,flexgqa,flex64at 2>&1 | quiet | grep --line-buffered "^{" > $OUT/attn.txt
  since "attention kernels"
}
before() {
  (cd before && PYTHONPATH=$PWD:/tmp/site timeout ${B_S:-55} python3 tools/profile_step.py $PROF $REAL \
    --json $OUT/before.json 2>&1 | quiet > $OUT/before.txt)
  since "before (5bb1260), real data"; grep "^\[" $OUT/before.txt
}
anchor() {
  timeout ${N_S:-45} python3 tools/profile_step.py $PROF --baseline --json $OUT/anchor.json 2>&1 | quiet > $OUT/anchor.txt
  since "after, synthetic + anchor"; grep "^\[" $OUT/anchor.txt
}
if [ "${GPUS:-2}" = 1 ]; then  # one GPU: the parts one after the other, the most important first
  export CUDA_VISIBLE_DEVICES=0; after; before; anchor; cuda_tests
else
  (export CUDA_VISIBLE_DEVICES=1; after; cuda_tests; kernels) &
  (export CUDA_VISIBLE_DEVICES=0; before; anchor) &
  wait
fi
python3 tools/device/real_rows.py "$OUT" before after anchor
echo "=== tests"; cat $OUT/tests.txt
echo "=== attention kernels"; cat $OUT/attn.txt 2>/dev/null | cut -c1-300
for f in before after anchor; do echo "=== $f (errors)"; grep -i "error\|Traceback\|failed" $OUT/$f.txt | head -5 | cut -c1-300; done
echo "all done after $(( $(date +%s) - T0 )) s"
