#!/usr/bin/env bash
# Quality at a CPU-sized budget (1500 steps) for variants of the default config, side by side on
# one H200 (fp32 like the CPU default). Each variant is judged by tools/eval_quality.py.
. tools/device/setup.sh
T0=$(date +%s)
COMMON="--set train.device=cuda --set train.dtype=fp32 --set train.steps=${STEPS:-1500} --set train.max_minutes=0 --set train.report=false --set train.save_every=0 --set data.num_workers=3"
HEAVY="--set train.dataset_mix=t2i=0.7,i2t=0.3 --set data.local=data_cache/fm_heavy/train --set train.eval_data=data_cache/fm_heavy/test --set data.tokenizer.path=data_cache/fm_heavy/tokenizer.model"
run() {  # name, extra args
  local name=$1; shift
  python3 -m megaflow.cli train $COMMON --set train.out_dir=/tmp/v_$name "$@" > /tmp/v_$name.log 2>&1
  echo "[$name] trained after $(( $(date +%s) - T0 )) s: $(tail -1 /tmp/v_$name.log | cut -c1-200)"
}
python3 -c "from data_pipeline.writers import build_dataset as b; b('fashion_mnist','data_cache/fm_heavy/train','train',mix={'t2i':0.7,'i2t':0.3})" >/dev/null 2>&1 &
python3 -c "from data_pipeline.writers import build_dataset as b; b('fashion_mnist','data_cache/fashion_mnist/train','train')" >/dev/null 2>&1 &
wait
python3 -c "
from megaflow.config import load_config; from megaflow.train import prepare_data
prepare_data(load_config('configs/default.yaml'))
prepare_data(load_config('configs/default.yaml', ['train.dataset_mix=t2i=0.7,i2t=0.3', 'data.local=data_cache/fm_heavy/train', 'train.eval_data=data_cache/fm_heavy/test', 'data.tokenizer.path=data_cache/fm_heavy/tokenizer.model']))" 2>&1 | tail -2
echo "data built after $(( $(date +%s) - T0 )) s"
run base &
run heavy32 $HEAVY &
run heavy16p4 $HEAVY --set data.image_size=16 --set model.fae.image_size=16 --set data.image_fit=resize --set data.seq_len=128 &
run heavy16p2 $HEAVY --set data.image_size=16 --set model.fae.image_size=16 --set data.patch_size=2 --set model.fae.patch_size=2 --set data.image_fit=resize &
wait
for v in base heavy32 heavy16p4 heavy16p2; do
  for G in "4 0.8" "2 1.0"; do set -- $G
    timeout 120 python3 tools/eval_quality.py --checkpoint /tmp/v_$v --device cuda --samples 20 --images 300 --guidance $1 --temperature $2 --eval-batches 8 --out /tmp/e_${v}_$1 2>&1 | grep "^(a)\|^(b)\|^(c)\|^classifier" | sed "s/^/[$v g$1 t$2] /"
  done
  cp /tmp/e_${v}_4/samples.png $OUT/samples_$v.png 2>/dev/null
done
echo "total $(( $(date +%s) - T0 )) s"
