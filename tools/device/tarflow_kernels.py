"""The one-pass SwiGLU backward kernel (megaflow/model/swiglu.py) at the step's shapes, per tile shape:
its default tiles (4 rows x 512 columns) leave the last column block of F = 2,128 (TarFlow's) 84% empty.

    python3 tools/device/tarflow_kernels.py [--iters 20]

Shapes: TarFlow at ml-tarflow's ImageNet-64 shape (32,768 tokens x F 2,128), h200_1b's VLM (16,384 x
5,632) and flow (16,384 x 2,816) streams. For each tile (rows x columns, warps): ms (CUDA events,
median), GB/s over the 5 bf16 accesses per (gate, up) pair, and whether the result equals the
default tiles' bit for bit (the same fp32 arithmetic per element, so it must).
"""
from __future__ import annotations

import argparse

import torch

from megaflow.model.swiglu import swiglu_backward_triton
from tools.bench_attention import timed

SHAPES = {"tarflow": (32768, 2128), "h200_1b vlm": (16384, 5632), "h200_1b flow": (16384, 2816)}
TILES = [(4, 512, 4), (8, 256, 4), (16, 128, 4), (32, 128, 8), (8, 512, 8), (16, 256, 8), (64, 64, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    for name, (rows, F) in SHAPES.items():
        dm = torch.randn(rows, F, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(rows, 2 * F, device="cuda", dtype=torch.bfloat16)
        want = swiglu_backward_triton(dm, gu)
        for br, bf, w in TILES:
            ms = timed(lambda: swiglu_backward_triton(dm, gu, br, bf, w), a.iters, 3)
            same = torch.equal(swiglu_backward_triton(dm, gu, br, bf, w), want)
            print(f"swiglu backward {name:12s} ({rows} x {F}) tile {br:3d} x {bf:3d}, {w} warps: {ms:.3f} ms, "
                  f"{5 * 2 * rows * F / ms / 1e6:.0f} GB/s{'' if same else ', DIFFERS'}", flush=True)


if __name__ == "__main__":
    main()
