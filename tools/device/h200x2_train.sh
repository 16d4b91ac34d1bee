#!/usr/bin/env bash
# One call on a lent nvidia-h200-x2: `megaflow train` under torchrun on NCCL (configs/tiny.yaml,
# the digits data carried in data_cache/digits): DP2, TP2, PP2 (3 micro-batches), ZeRO-1 DP2 (bf16),
# each 6 steps with a checkpoint at step 3, then the step-3 checkpoint resumed to step 6; prints the
# largest loss / weight difference between the resumed and the uninterrupted run (GPU kernels are
# not all deterministic, so small differences are possible) and each run's wall time.
. tools/device/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_ds/*.whl
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
COMMON="--config configs/tiny.yaml --set train.device=cuda --set train.steps=6 --set train.save_every=3 --set train.keep_last=5 --set train.threads=0"
train() {  # name, out, extra args...
  local name=$1 out=$2; shift 2
  local t0=$(date +%s.%N)
  timeout 240 torchrun --standalone --nproc_per_node 2 -m megaflow.cli train $COMMON --set train.out_dir=$out "$@" \
    > $out.log 2>&1
  local rc=$?
  echo "[$name] $out rc=$rc $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f} s')") $(grep -h 'resumed from' $out.log | cut -c1-120)"
  [ $rc -eq 0 ] || tail -30 $out.log
}
for spec in "dp2:--set train.dtype=fp32" "tp2:--set parallel.tp=2 --set train.dtype=fp32" \
            "pp2:--set parallel.pp=2 --set parallel.micro_batches=3 --set train.dtype=fp32" \
            "zero1_bf16:--set parallel.zero_stage=1"; do
  name=${spec%%:*}; args=${spec#*:}
  train $name /tmp/g_$name $args
  mkdir -p /tmp/s_$name/checkpoints && cp -r /tmp/g_$name/checkpoints/step_000003 /tmp/s_$name/checkpoints/
  train $name-resume /tmp/s_$name $args --resume
  python3 - $name <<'PY'
import sys, torch
n = sys.argv[1]
L = lambda d, f: torch.load(f"/tmp/{d}_{n}/checkpoints/step_000006/{f}", map_location="cpu", weights_only=False)
a, b = L("g", "trainer.pt")["history"], L("s", "trainer.pt")["history"]
wa, wb = L("g", "model.pt"), L("s", "model.pt")
print(f"  [{n}] losses {[round(h['loss'], 5) for h in a]}")
print(f"  [{n}] resumed: max loss diff {max(abs(x['loss'] - y['loss']) for x, y in zip(a, b)):.3g}, "
      f"max weight diff {max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa):.3g}, {len(wa)} tensors")
PY
done
grep -h "pipeline layout" -A3 /tmp/g_pp2.log | head -4
grep -h "eval" /tmp/g_dp2.log /tmp/g_zero1_bf16.log | head -4
