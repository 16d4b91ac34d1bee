#!/usr/bin/env bash
# Source on a lent H200 (after tools/device/setup.sh): FlashAttention-4 (PyPI flash-attn-4, CuTe DSL; the kernels
# behind FlexAttention's BACKEND="FLASH" and flash_attn.cute) and quack-kernels into /tmp/fa4site/site-packages. CuTe DSL's CUDA 13 library wheel
# (nvidia-cutlass-dsl-libs-cu13, 88 MiB) is over one call's 64 MiB, so it travels in two parts over two calls
# on one warm machine: call 1 carries .gpu/fa4a (part 00) and runs `mkdir -p ~/fa4 && cp .gpu/fa4a/* ~/fa4/`;
# call 2 carries .gpu/fa4b (part 01 and the small wheels) and sources this file. Built here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...
#     flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.7.1 nvidia-cutlass-dsl-libs-base==4.7.1
#     nvidia-cutlass-dsl-libs-core==4.7.1 nvidia-cutlass-dsl-libs-cu13==4.7.1 apache-tvm-ffi==0.1.11
#     torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
#   split -b 50m -d nvidia_cutlass_dsl_libs_cu13-*.whl cu13part.; echo <that wheel's file name> > cu13.name
# (cutlass-dsl 4.7.1, not 4.8.1: quack 0.6.5's kernel cache cannot key 4.8.1's new _LOC_TRANSFORMS ContextVar and
# refuses every GEMM; FA4 ran on both.)
# Sets FA4_OK=1 when flash_attn.cute imports.
FA4_OK=0
if [ -d .gpu/fa4b ]; then mkdir -p ~/fa4 && cp .gpu/fa4b/* ~/fa4/; fi
if [ ! -f ~/fa4/cu13part.00 ] || [ ! -f ~/fa4/cu13part.01 ]; then
  echo "fa4_setup: part 00 or 01 of the cu13 wheel is missing (a fresh machine: carry .gpu/fa4a in a call first)"
else
  W=~/fa4/$(cat ~/fa4/cu13.name)  # the wheel's own file name (pip reads its version from it)
  cat ~/fa4/cu13part.00 ~/fa4/cu13part.01 > $W
  # a folder named site-packages: quack keys its kernel cache on the code of the epilogue functions and takes
  # library code (a path with /site-packages/) by name; from any other folder it walks into cutlass's module
  # globals (a Logger, a ContextVar) and refuses every GEMM
  S=/tmp/fa4site/site-packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S ~/fa4/*.whl
  # the wheel's .pth (dsl_packages on sys.path) is read only in site directories, not from PYTHONPATH
  export PYTHONPATH="$S/nvidia_cutlass_dsl/dsl_packages:$S${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import flash_attn.cute, cutlass; print('fa4_setup: flash_attn.cute imports; cutlass', cutlass.__file__)" \
    && FA4_OK=1
fi
