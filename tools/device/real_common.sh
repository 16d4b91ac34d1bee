# Sourced (after tools/device/setup.sh) by the scripts of h200_1b's real-data rows, att13_final.sh and att14_rows.sh:
# the inductor cache carried in .inductor/ restored, the profile flags of h200_1b on real packed Fashion-MNIST
# (.fm1b: h200_1b's mix, 8,000 documents) with STEPS timed steps, a timer since the start and a log filter.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
ls .inductor/inductor.tgz.* >/dev/null 2>&1 && cat .inductor/inductor.tgz.* | tar xz -C /tmp && echo "inductor cache restored"
T0=$(date +%s)
since() { echo "== $1 done after $(( $(date +%s) - T0 )) s"; }
D=$PWD/.fm1b
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3 --steps ${STEPS:-6}"
REAL="--real-data --set data.local=$D/train --set data.tokenizer.path=$D/tokenizer.model --set train.dataset_limit=8000"
quiet() { grep --line-buffered -v "Warning\|^W1[12]\|warnings.warn\|^ *$\|_warn_once\|checkpointed region\|^DEBUG"; }
# The parts the closing scripts (lead11_final.sh, lead12.sh) share, each one process: `rows` runs VARIANTS, then
# `after=` (the defaults) traced back to back (TRACE=0: not traced), then the plain-PyTorch anchors (--baseline: unpacked and packed) ->
# $OUT/after.json; `synth` the defaults on the synthetic batch -> $OUT/synth.json; `tests` the CUDA tests TESTS
# selected by TEST_K (each script sets its own). Need OUT and L (the log folder).
rows() {
  eval "set -- ${VARIANTS:-}"
  [ "${TRACE:-1}" = 1 ] && set -- "$@" --trace /tmp/trace --trace-loop --trace-steps 3  # TRACE=0: no trace (a shorter part)
  timeout ${R_S:-300} python3 tools/profile_step.py $PROF $REAL "$@" --variant after= \
    --baseline --json $OUT/after.json 2>&1 | quiet > $L/after.txt
  since "rows (variants, after traced, anchors)"; grep "^\[\|back to back:\|GPU ms a step\|baseline\|GPU kernel time\|GPU busy\|Error\|error" $L/after.txt | cut -c1-300
  sed -n '/top kernels/,/trace /p' $L/after.txt | head -32 | cut -c1-160
}
synth() {
  timeout ${S_S:-120} python3 tools/profile_step.py $PROF --variant synth= --json $OUT/synth.json 2>&1 | quiet > $L/synth.txt
  since "synthetic (defaults)"; grep "^\[\|back to back:\|GPU ms a step" $L/synth.txt | cut -c1-260
}
tests() {
  timeout ${T_S:-120} python3 -m pytest -q -p no:cacheprovider $TESTS -k "$TEST_K" 2>&1 | grep -v "^DEBUG" > $L/tests.txt
  since "CUDA tests"; tail -4 $L/tests.txt; grep -m3 -B2 -A12 "^E " $L/tests.txt | cut -c1-250 | head -40
}
