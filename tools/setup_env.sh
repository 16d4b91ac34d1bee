#!/usr/bin/env bash
# Creates .venv and installs everything megaflow needs, from the project's own files only.
# Idempotent: `make env` runs it when requirements*.txt or pyproject.toml change.
#   - Debian packages (when run as root and missing): Fashion-MNIST and the color-emoji font (data),
#     and SLURM + munge (tools/slurm_local.sh install: ~3 MB, no daemon started) for the test that
#     runs the launchers on a real local SLURM
#   - requirements.txt (torch 2.13.0 CPU build in the SAME pip command as deepspeed, so that
#     deepspeed's resolver cannot pull a multi-GB CUDA torch)
#   - requirements-nodeps.txt with --no-deps (mosaicml-streaming without torchvision/cloud SDKs,
#     and two packages we only read data files from)
#   - megaflow itself, editable, without dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need_apt+=(fonts-noto-color-emoji)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: WARNING: missing Debian packages ${need_apt[*]} (run as root: apt-get install ${need_apt[*]});" \
         "tests that need them will skip, and the default training run needs dataset-fashion-mnist" >&2
  fi
fi
bash tools/slurm_local.sh install || echo "setup: WARNING: SLURM is not installed; as root with apt-get" \
  "tests/launchers/test_slurm_real.py tries again (and fails if it cannot), elsewhere it skips" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip, quietly, without the "Location ... is ignored" noise of this machine's pip config; its exit code kept
pipq() {
  local rc=0 log; log=$(mktemp)
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return "$rc"
}
pipq -r requirements.txt
pipq --no-deps -r requirements-nodeps.txt
pipq --no-deps --no-build-isolation -e .
DS_ACCELERATOR=cpu .venv/bin/python -c "import torch, deepspeed, sentencepiece, yaml, transformers; import data_pipeline.streaming_compat" 2>/dev/null \
  || { echo "setup: the environment is incomplete (see the pip output above)" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
