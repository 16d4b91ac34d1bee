#!/usr/bin/env bash
# FlashAttention-4 (CuTe DSL) against megaflow's attention kernels on one H200 (session 13). Needs the two-call
# carry of tools/device/fa4_setup.sh (this is call 2: carry .gpu/fa4b). Parts (PARTS, each its own process/limit):
#   tiles   h200_1b's document masks at the real layouts, one layer fwd + bwd as a CUDA graph (flex_tiles.py):
#           Triton flex (m128, m64: the model's) vs FLASH (FA4 through flex's BACKEND="FLASH") at both block sizes
#   causal  TarFlow's causal 32 x 12 heads x 1,024 x 64 (sdpa_backends.py --fa4): cuDNN (the model's) vs FA4
#   dense   the VLM's 16 x 16 heads x 1,024 x 128, causal, the same rows
# Usage on the device: PARTS="tiles causal dense" bash tools/device/fa4_probe.sh  (K_S C_S E_S: limits in s)
. tools/device/setup.sh
. tools/device/fa4_setup.sh
[ "$FA4_OK" = 1 ] || { echo "FA4 not importable: stop"; exit 3; }
OUT=${OUT:-/tmp/fa4_out}; mkdir -p "$OUT"
. tools/device/real_common.sh  # T0, since, quiet; the carried inductor cache
python3 -c "import torch, flash_attn.cute as f; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv,noheader
tiles() {
  timeout ${K_S:-240} python3 tools/device/flex_tiles.py --batches 2 --shapes ${TILE_SHAPES:-vlm,flow} \
    --rows ${TILE_ROWS:-m128,m64,m128_flash,m64_flash} 2>&1 | quiet > $OUT/tiles.txt
  since "flex tiles vs FLASH"; cut -c1-400 $OUT/tiles.txt | grep -v "^\s*File\|^Traceback" | tail -12
}
causal() {
  timeout ${C_S:-120} python3 tools/device/sdpa_backends.py --fa4 2>&1 | quiet > $OUT/causal.txt
  since "TarFlow causal shape"; cut -c1-300 $OUT/causal.txt | tail -12
}
dense() {
  timeout ${E_S:-120} python3 tools/device/sdpa_backends.py --fa4 --rows 16 --heads 16 --head-dim 128 2>&1 | quiet > $OUT/dense.txt
  since "VLM dense causal shape"; cut -c1-300 $OUT/dense.txt | tail -12
}
for part in ${PARTS:-tiles causal dense}; do $part; done
echo "all done after $(( $(date +%s) - T0 )) s"
