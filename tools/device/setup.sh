#!/usr/bin/env bash
# Source on a lent GPU machine (torch preinstalled, no internet), from the repo root:
#   . tools/device/setup.sh
# Installs the carried wheels (.whl/: mosaicml-streaming and its compression libs, which that
# image lacks) into /tmp/site, places the carried Fashion-MNIST files (.fmnist/) where Debian's
# package puts them, and points Python at the checkout. See docs/benchmarks.md for the runs.
set -e
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
if [ -d .fmnist ]; then
  mkdir -p /usr/share/datasets/fashion-mnist && cp -n .fmnist/*.gz /usr/share/datasets/fashion-mnist/
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
megaflow() { python3 -m megaflow.cli "$@"; }
set +e
