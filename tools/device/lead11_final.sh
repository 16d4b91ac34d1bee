#!/usr/bin/env bash
# Session 11's closing measurement of issue 13's real-data row (one H200), the parts one after the other, each its
# own process and limit, the most important first:
#   rows    this tree, one process: `--variant b128=model.mask_block=128` (the 128-token blocks of before round
#           10), `--variant nobf16=train.bf16_grads=off` (the fp32 gradient copy), then `--variant after=` (the
#           defaults), traced back to back (--trace-loop, the last variant), then the plain-PyTorch anchor (--baseline)
#   synth   this tree's defaults on the synthetic batch (16 one-document rows), its own process
#   tests   the CUDA tests of this session's kernels (TESTS, TEST_K)
#   before  `git archive 48a1fd0` (the session's start) in before/, its defaults, its own process
#   tiles   FlexAttention tiles at the VLM shape (tools/device/flex_tiles.py; TILE_ROWS)
# Usage on the device: PARTS="rows tests before" bash tools/device/lead11_final.sh  (R_S T_S B_S: limits in s; STEPS)
# Carries: .whl, .fm1b (real data), before/, .inductor/ (unpacked when present).
. tools/device/setup.sh
OUT=${OUT:-/tmp/lead11_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export CUDA_VISIBLE_DEVICES=0 STEPS=${STEPS:-10}
VARIANTS=${VARIANTS:---variant b128=model.mask_block=128 --variant nobf16=train.bf16_grads=off}
TESTS=${TESTS:-tests/model/test_masks.py tests/train/test_step_graph.py tests/train/test_fast_step.py}; TEST_K=${TEST_K:-gradients or pinning or kernel_equals}; T_S=${T_S:-90}
. tools/device/real_common.sh  # T0, since, PROF, REAL, quiet, rows, synth, tests; the carried inductor cache
before() {
  (cd before && PYTHONPATH=$PWD:/tmp/site timeout ${B_S:-90} python3 tools/profile_step.py $PROF $REAL \
    --json $OUT/before.json 2>&1 | quiet > $L/before.txt)
  since "before (48a1fd0), real data"; grep "^\[\|back to back:\|GPU ms a step" $L/before.txt | cut -c1-260
}
tiles() {
  timeout ${K_S:-150} python3 tools/device/flex_tiles.py --batches 2 --shapes vlm \
    --rows ${TILE_ROWS:-m128,m64,m64_b64x64s3w4,m64_b32x64s2w4,m64_f64x64s2w4,m64_at} > $OUT/tiles.txt 2> $L/tiles_err.txt
  since "VLM tiles"; cut -c1-300 $OUT/tiles.txt; grep -A2 "^AUTOTUNE" $L/tiles_err.txt | cut -c1-200
}
for part in ${PARTS:-rows synth tests before}; do $part; done
echo "=== rows"; python3 tools/device/real_rows.py "$OUT" after before 2>&1 | cut -c1-700
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "all done after $(( $(date +%s) - T0 )) s"
