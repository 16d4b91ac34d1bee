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
