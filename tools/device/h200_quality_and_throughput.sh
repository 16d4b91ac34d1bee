#!/usr/bin/env bash
# One call on a lent nvidia-h200 (see docs/benchmarks.md):
#  1. quality vs training length of the default Fashion-MNIST config: three runs (800, 1500,
#     3000 steps, fp32 like the CPU default) side by side on the one GPU, each judged by
#     tools/eval_quality.py (the same judge as the CPU report);
#  2. the ~0.9B-parameter throughput run (configs/h200_1b.yaml, bf16, 100 steps) alone on the GPU;
#  3. KV-cached vs uncached sampling of 256 image tokens.
# Small result files go to $OUT.
. tools/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
T0=$(date +%s)
python3 -c "from data_pipeline.writers import build_dataset as b; b('fashion_mnist','data_cache/fashion_mnist/train','train'); b('fashion_mnist','data_cache/fashion_mnist/test','test',limit=400)" 2>&1 | tail -2
python3 -c "
from megaflow.config import load_config; from megaflow.train import prepare_data
prepare_data(load_config('configs/default.yaml'))" 2>&1 | tail -2
echo "data ready after $(( $(date +%s) - T0 )) s"
for S in ${STEPS:-800 1500 3000}; do
  ( python3 -m megaflow.cli train --set train.device=cuda --set train.dtype=fp32 --set train.steps=$S \
      --set train.max_minutes=0 --set train.report=false --set train.save_every=0 --set data.num_workers=3 \
      --set train.out_dir=/tmp/q$S > /tmp/q$S.log 2>&1
    python3 tools/eval_quality.py --checkpoint /tmp/q$S --device cuda --samples 20 --images 300 --eval-batches 16 > /tmp/q$S.eval 2>&1
    cp /tmp/q$S/report.txt $OUT/report_$S.txt; cp /tmp/q$S/samples.png $OUT/samples_$S.png
    echo "run $S done after $(( $(date +%s) - T0 )) s"; tail -1 /tmp/q$S.log ) &
done
wait
for S in ${STEPS:-800 1500 3000}; do echo "== $S steps"; grep -E "it/s|s/it" /tmp/q$S.log | tail -1 | tr '\r' '\n' | tail -1; cat $OUT/report_$S.txt; done
python3 -m megaflow.cli train --config configs/h200_1b.yaml --set train.out_dir=/tmp/h200_1b --set train.save_every=-1 2>&1 \
  | tr '\r' '\n' | grep -v overflow > $OUT/h200_1b.log
python3 - <<'PY'
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import glob, statistics
ea = EventAccumulator(glob.glob('/tmp/h200_1b/tb')[0]); ea.Reload()
for tag in ('perf/tokens_per_s', 'perf/images_per_s', 'perf/mfu', 'perf/mem_gib', 'perf/step_s', 'train/loss'):
    vals = [e.value for e in ea.Scalars(tag)]
    print(f"{tag:20s} last {vals[-1]:.4g}  median(after warm-up) {statistics.median(vals[2:]):.4g}  n={len(vals)}")
PY
python3 tools/bench_kv_cache.py --device cuda --repeats 3
echo "total $(( $(date +%s) - T0 )) s"
