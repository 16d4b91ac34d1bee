#!/usr/bin/env bash
# The lead's one call on nvidia-h200-x2 at the end of session 7, on the merged code, every part under its own limit:
#  1. both GPUs side by side (tools/device/step13_last.sh): GPU 0 h200_1b's graphed step beside the plain-PyTorch
#     anchor in one process; GPU 1 the real-data rows (packed Fashion-MNIST: default, graph) + the add_norm test;
#  2. both GPUs: TP2 eager vs TP2 as one CUDA graph a step (train.step_graph=on), TP2+SP graphed, one GPU
#     (tools/device/h200x2_tp.sh graph, tpsp's inductor cache);
#  3. both GPUs: PP2 with torch FP8 (the VLM's width-2048 linears), configs/h200_1b.yaml, real data, eager,
#     4 micro-batches, 50 steps, the loss every 5 (issue 19's "PP2 with FP8 runs 50 steps").
# Usage on the device: bash tools/device/lead7_check.sh   (S1 S2 S3: limits in s)
. tools/device/setup.sh
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
G_S=${S1:-75} R_S=${S1:-75} bash tools/device/step13_last.sh
el "part 1 done"
mkdir -p .cache && cp .gpu_cache/inductor.tgz.* .cache/ 2>/dev/null
NOCACHE=1 S=${S2:-85} ROWS="tp2,tp2@train.step_graph=on,tp2sp@train.step_graph=on,one" bash tools/device/h200x2_tp.sh graph
el "part 2 done"
timeout ${S3:-70} torchrun --nproc_per_node 2 -m megaflow.cli train --config configs/h200_1b.yaml --set parallel.pp=2 \
  --set parallel.micro_batches=4 --set data.batch_size=8 --set train.param_dtype=bf16 --set train.compile=off \
  --set parallel.fp8=current --set parallel.fp8_backend=torch --set parallel.fp8_min_dim=2048 \
  --set data.local=data_cache/fm1b/train --set data.tokenizer.path=data_cache/fm1b/tokenizer.model \
  --set train.dataset_limit=8000 --set data.num_workers=4 --set train.steps=50 --set train.warmup=5 \
  --set train.log_every=5 --set train.save_every=-1 --set train.out_dir=/tmp/pp2_fp8 2>&1 | tr '\r' '\n' \
  | grep -v "Warning\|warn\|overflow\|^ *$" | grep -E "FP8|step|loss|Error|error" | tail -16
el "part 3 done (PP2 FP8)"
