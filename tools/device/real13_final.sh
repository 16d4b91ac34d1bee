#!/usr/bin/env bash
# Issue 13, h200_1b's real-data row, before / after in one call on nvidia-h200-x2, each its own process:
# GPU 0 "before" = `git archive b91a671` unpacked in before/ (its default: the graphed step), real packed
# Fashion-MNIST (data_cache/fm1b), then the CUDA tests of the document kernels (tests/model/test_masks.py),
# then this tree's synthetic batch with the plain-PyTorch anchor (--baseline); GPU 1 "after" = this tree,
# the same data, its default (the varlen variant of round 6 was removed after it measured slower).
# MFU by this tree's rule (profile_step's FLOPs of real data were scaled by the slot fill twice before;
# the "before" figures are corrected below with its own slot fill).
# Carries: .whl (mosaicml-streaming), data_cache/fm1b, before/, .inductor/ (unpacked when present).
# Usage on the device: bash tools/device/real13_final.sh   (B_S T_S N_S A_S: limits in s)
. tools/device/setup.sh
OUT=${OUT:-/tmp/real13_out}; mkdir -p "$OUT"; T0=$(date +%s)
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
ls .inductor/inductor.tgz.* >/dev/null 2>&1 && cat .inductor/inductor.tgz.* | tar xz -C /tmp && echo "inductor cache restored"
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
D=$PWD/data_cache/fm1b
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3 --steps ${STEPS:-8}"
REAL="--real-data --set data.local=$D/train --set data.tokenizer.path=$D/tokenizer.model --set train.dataset_limit=8000"
quiet() { grep --line-buffered -v "Warning\|^W1130\|^W1201\|warnings.warn\|^ *$\|_warn_once\|checkpointed region\|^DEBUG"; }
(
  export CUDA_VISIBLE_DEVICES=0
  (cd before && PYTHONPATH=$PWD:/tmp/site timeout ${B_S:-60} python3 tools/profile_step.py $PROF $REAL --json $OUT/before.json \
    2>&1 | quiet > $OUT/before.txt)
  since "gpu0: before (b91a671), real data"
  timeout ${T_S:-30} python3 -m pytest -q -p no:cacheprovider tests/model/test_masks.py -k "gradients" 2>&1 \
    | grep -v "^DEBUG" | tail -4 > $OUT/tests.txt
  since "gpu0: CUDA tests"
  timeout ${N_S:-45} python3 tools/profile_step.py $PROF --baseline --json $OUT/anchor.json 2>&1 | quiet > $OUT/anchor.txt
  since "gpu0: after, synthetic + anchor"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${A_S:-95} python3 tools/profile_step.py $PROF $REAL --variant after= \
    --json $OUT/after.json 2>&1 | quiet | tee $OUT/after.txt | grep --line-buffered "^\["
  since "gpu1: after, real data"
) &
wait
python3 tools/device/real_rows.py "$OUT" before after anchor --fill-fix before
echo "=== tests"; cat $OUT/tests.txt
echo "all done after $(( $(date +%s) - T0 )) s"
