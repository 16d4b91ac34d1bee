#!/usr/bin/env bash
# Issue 13's rows on one H200 (session 12; every row in one call: PARTS="rows synth ac tarflow"). Parts, each its own process and limit:
#   diag    what cuDNN's variable-length attention accepts here (tools/device/cudnn_varlen_diag.py all)
#   tests   the CUDA tests of the flat AdamW kernel and the step graph (TESTS, TEST_K)
#   rows    this tree, one process: VARIANTS (default: `m32=train.moments_dtype=fp32`) then `after=` (the defaults),
#           traced back to back (--trace-loop), then the plain-PyTorch anchors (--baseline: unpacked and packed)
#   synth   this tree's defaults on the synthetic batch (16 one-document rows), its own process
#   tiles   FlexAttention alone at the real layouts with inductor's coordinate-descent tuning (TILES_CDT, TILE_ROWS)
#   ac      h200_1b's activation-checkpointing rows (selective, full) on the synthetic batch, its own process
#   tarflow the TarFlow-only row (configs/tarflow_imagenet64.yaml, batch 32) and its anchor, its own process
#   keep_cache  the inductor cache of this call into $OUT/inductor/ (15 MB parts: a call returns files of at most
#           16 MiB, 8 files and 64 MiB in all, logs and json included), to carry into the next,
#           and the launch configurations tuning chose for FlexAttention's kernels (tools/device/best_configs.py)
# Usage on the device: PARTS="tests rows synth" bash tools/device/lead12.sh  (D_S T_S R_S S_S K_S AC_S TF_S: limits in s; STEPS)
# Carries: .whl, .fm1b (real data), .inductor/ (unpacked when present).
. tools/device/setup.sh
OUT=${OUT:-/tmp/lead12_out}; mkdir -p "$OUT/logs"; L=$OUT/logs
export CUDA_VISIBLE_DEVICES=0 STEPS=${STEPS:-10}
VARIANTS=${VARIANTS---variant m32=train.moments_dtype=fp32}  # VARIANTS= (empty): the defaults only
TESTS=${TESTS:-tests/train/test_fast_step.py tests/train/test_bf16_moments.py}; TEST_K=${TEST_K:-kernel_equals or moments}
. tools/device/real_common.sh  # T0, since, PROF, REAL, quiet, rows, synth, tests; the carried inductor cache
diag() {
  timeout ${D_S:-200} python3 tools/device/cudnn_varlen_diag.py all > $OUT/diag.txt 2> $L/diag_err.txt
  since "cuDNN varlen diagnosis"; cut -c1-400 $OUT/diag.txt
}
tiles() {  # FlexAttention at the real layouts (tools/device/flex_tiles.py), inductor's coordinate descent on (TILES_CDT=1)
  TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=${TILES_CDT:-1} timeout ${K_S:-120} python3 tools/device/flex_tiles.py --batches 2 \
    --shapes vlm,flow --rows ${TILE_ROWS:-m64} > $OUT/tiles.txt 2> $L/tiles_err.txt
  since "flex tiles (coordinate descent ${TILES_CDT:-1})"; cut -c1-300 $OUT/tiles.txt
}
ac() {  # the activation-checkpointing rows of h200_1b (synthetic batch), time and peak memory
  timeout ${AC_S:-150} python3 tools/profile_step.py $PROF --variant ac_selective=train.activation_checkpointing=selective \
    --variant ac_full=train.activation_checkpointing=full --json $OUT/ac.json 2>&1 | quiet > $L/ac.txt
  since "activation checkpointing rows"; grep "^\[\|back to back:" $L/ac.txt | cut -c1-260
}
tarflow() {  # TarFlow-only at ml-tarflow's ImageNet-64 shape, batch 32, beside its plain-PyTorch anchor (same process)
  timeout ${TF_S:-150} python3 tools/profile_step.py --config configs/tarflow_imagenet64.yaml --device cuda --warmup 3 \
    --steps $STEPS --images-per-row 1 --baseline --variant tarflow= --json $OUT/tarflow.json 2>&1 | quiet > $L/tarflow.txt
  since "TarFlow, batch 32"; grep "^\[\|back to back:\|baseline" $L/tarflow.txt | cut -c1-300
}
keep_cache() {  # the inductor cache this call filled (e.g. train.compile_mode=tuned's tuning), for the next call to carry
  mkdir -p $OUT/inductor && tar cz -C /tmp inductor | split -b 15m - $OUT/inductor/inductor.tgz.
  since "inductor cache kept: $(du -sh $OUT/inductor | cut -f1) (carry it as .inductor/)"
  python3 tools/device/best_configs.py /tmp/inductor --match flex > $OUT/flex_best_configs.txt  # what tuning chose for flex
  tail -1 $OUT/flex_best_configs.txt; head -8 $OUT/flex_best_configs.txt | cut -c1-300
}
for part in ${PARTS:-tests rows synth}; do $part; done
echo "=== rows"; python3 tools/device/real_rows.py "$OUT" after synth ac tarflow 2>&1 | grep -v "no result" | cut -c1-700
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "all done after $(( $(date +%s) - T0 )) s"
