#!/usr/bin/env bash
# Issue 13, h200_1b's real-data row: where real packed batches lose MFU against synthetic ones (one call
# on nvidia-h200-x2). GPU 0: synthetic batches (16 x 1024, 7 images a row, causal SDPA), then the
# attention kernels at the real layouts (tools/device/real13_attn.py). GPU 1: real packed Fashion-MNIST
# (data_cache/fm1b through the data pipeline, FlexAttention document masks). Each profile: the graphed
# step, then the ungraphed one traced (2 steps: kernel time by category, top kernels).
# Carries: .whl (mosaicml-streaming), data_cache/fm1b; the inductor cache comes back as $OUT/inductor.tgz.*
# and is unpacked from .inductor/ when carried. Usage on the device: bash tools/device/real13_diag.sh
. tools/device/setup.sh
OUT=${OUT:-/tmp/real13_out}; mkdir -p "$OUT"; T0=$(date +%s)
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
ls .inductor/inductor.tgz.* >/dev/null 2>&1 && cat .inductor/inductor.tgz.* | tar xz -C /tmp && echo "inductor cache restored"
since() { echo "$1 done after $(( $(date +%s) - T0 )) s"; }
PROF="--config configs/h200_1b.yaml --device cuda --warmup 3 --steps ${STEPS:-5} --trace-steps 2"
REAL="--real-data --set data.local=data_cache/fm1b/train --set data.tokenizer.path=data_cache/fm1b/tokenizer.model --set train.dataset_limit=8000"
VARS="--variant graph=train.step_graph=on --variant eager=train.step_graph=off"
quiet() { grep --line-buffered -v "Warning\|^W1130\|^W1201\|warnings.warn\|^ *$\|_warn_once\|checkpointed region\|^DEBUG"; }
(
  export CUDA_VISIBLE_DEVICES=0
  timeout ${S_S:-70} python3 tools/profile_step.py $PROF $VARS --trace /tmp/tr_syn --json $OUT/syn.json 2>&1 | quiet > /tmp/syn.txt
  since "gpu0: synthetic"; head -c 400 /tmp/syn.txt | grep "^\[" 
  timeout ${A_S:-45} python3 tools/device/real13_attn.py --batches 2 --iters 8 2>&1 | quiet | grep "^{" > $OUT/attn.txt
  since "gpu0: attention"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${R_S:-80} python3 tools/profile_step.py $PROF $REAL $VARS --trace /tmp/tr_real --json $OUT/real.json 2>&1 | quiet > /tmp/real.txt
  since "gpu1: real data"
) &
wait
cp /tmp/syn.txt $OUT/syn.txt; cp /tmp/real.txt $OUT/real.txt
for f in syn real; do
  echo "=== $f"; grep "^\[\|GPU ms a step\|by category\|busy\|failed" $OUT/$f.txt | cut -c1-400
  grep -A 16 "top kernels" $OUT/$f.txt | cut -c1-150
done
echo "=== attention"; cat $OUT/attn.txt
tar czf /tmp/inductor.tgz -C /tmp inductor 2>/dev/null
if [ "$(stat -c %s /tmp/inductor.tgz)" -lt 45000000 ]; then split -b 15000000 /tmp/inductor.tgz $OUT/inductor.tgz.; fi
echo "inductor cache $(du -sh /tmp/inductor.tgz | cut -f1); all done after $(( $(date +%s) - T0 )) s"
