"""Causal SDPA forward + backward per backend (cuDNN, flash, memory-efficient) at one shape, bf16:
which kernel a plain is_causal layer should get (issue 13: TarFlow's 12 heads x 64 at 1,024 tokens).

    python3 tools/device/sdpa_backends.py --rows 32 --heads 12 --seq-len 1024 --head-dim 64
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_attention import timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name, default in (("rows", 32), ("heads", 12), ("seq-len", 1024), ("head-dim", 64), ("iters", 10)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    shape = (a.rows, a.heads, a.seq_len, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    flops = 4 * a.rows * a.heads * a.seq_len ** 2 * a.head_dim / 2  # causal: half the square, forward
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.iters, 3)
                both = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g), a.iters, 3)
            print(f"sdpa {backend.name:20s} {shape}: fwd {fwd:.3f} ms ({flops / fwd / 1e9:.0f} TFLOP/s causal), "
                  f"fwd+bwd {both:.3f} ms ({3.5 * flops / both / 1e9:.0f} TFLOP/s)", flush=True)
        except RuntimeError as e:
            print(f"sdpa {backend.name}: not available ({str(e).splitlines()[0][:120]})")
    print(f"default choice: fwd+bwd {timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g), a.iters, 3):.3f} ms")


if __name__ == "__main__":
    main()
