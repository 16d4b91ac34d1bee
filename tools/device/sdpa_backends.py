"""Causal attention forward + backward per kernel at one shape, bf16: which kernel a plain is_causal
layer should get (issue 13: TarFlow's 12 heads x 64 at 1,024 tokens).

    python3 tools/device/sdpa_backends.py --rows 32 --heads 12 --seq-len 1024 --head-dim 64

Rows: SDPA's cuDNN, flash and memory-efficient backends on contiguous (B, H, T, hd) q, k, v; cuDNN
again on the layout the model hands it (megaflow.model.rope.qkv_rope: q and k fresh tensors in
(B, T, H, hd) memory order, v a strided view of the QKV GEMM's output); and FlexAttention (compiled
`flex_attention` with a causal BlockMask, `--no-flex` skips it), checked against cuDNN's output.
TFLOP/s count the causal half of the square (forward 4 B H T^2 hd / 2, forward+backward 3.5x that).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tools.bench_attention import timed


def report(name: str, shape: tuple, flops: float, fwd, both) -> None:
    print(f"{name:28s} {shape}: fwd {fwd():.3f} ms ({flops / fwd.ms / 1e9:.0f} TFLOP/s causal), "
          f"fwd+bwd {both():.3f} ms ({3.5 * flops / both.ms / 1e9:.0f} TFLOP/s)", flush=True)


class Timed:
    """fn's median ms (tools.bench_attention.timed), kept in .ms once called."""

    def __init__(self, fn, iters: int):
        self.fn, self.iters, self.ms = fn, iters, float("nan")

    def __call__(self) -> float:
        self.ms = timed(self.fn, self.iters, 3)
        return self.ms


def model_layout(B: int, H: int, T: int, hd: int) -> tuple:
    """q, k, v as megaflow's attention gets them: (B, H, T, hd) views; q, k in (B, T, H, hd) memory, v
    a slice of a (B, T, 3H, hd) QKV output."""
    qkv = torch.randn(B, T, 3 * H, hd, device="cuda", dtype=torch.bfloat16)
    q, k = (torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    v = qkv[:, :, 2 * H:].transpose(1, 2)
    return tuple(t.requires_grad_() for t in (q, k)) + (v.detach().requires_grad_(),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name, default in (("rows", 32), ("heads", 12), ("seq-len", 1024), ("head-dim", 64), ("iters", 10)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~10-20 s)")
    ap.add_argument("--fa4", action="store_true", help="add FlashAttention-4's rows (flash_attn.cute, flex FLASH)")
    a = ap.parse_args()
    shape = (a.rows, a.heads, a.seq_len, a.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    flops = 4 * a.rows * a.heads * a.seq_len ** 2 * a.head_dim / 2  # causal: half the square, forward
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                report(f"sdpa {backend.name}", shape, flops, Timed(lambda: sdpa(q, k, v), a.iters),
                       Timed(lambda: sdpa(q, k, v).backward(g), a.iters))
        except RuntimeError as e:
            print(f"sdpa {backend.name}: not available ({str(e).splitlines()[0][:120]})")
    print(f"default choice: fwd+bwd {timed(lambda: sdpa(q, k, v).backward(g), a.iters, 3):.3f} ms", flush=True)
    qm, km, vm = model_layout(*shape)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        report("sdpa CUDNN, model's layout", shape, flops, Timed(lambda: sdpa(qm, km, vm), a.iters),
               Timed(lambda: sdpa(qm, km, vm).backward(g), a.iters))
        want = sdpa(q, k, v)
        want_grads = torch.autograd.grad(sdpa(q, k, v), (q, k, v), g)
    if not a.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, a.seq_len, a.seq_len, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        rows = [("flex", lambda q, k, v: flex(q, k, v, block_mask=mask))]
        if a.fa4:
            flash = {"BACKEND": "FLASH"}
            rows.append(("flex FLASH (FA4)", lambda q, k, v: flex(q, k, v, block_mask=mask, kernel_options=flash)))
        for name, fn in rows:
            checked(name, fn, (q, k, v), g, want, want_grads, shape, flops, a.iters)
    if a.fa4:
        from flash_attn.cute import flash_attn_func

        def fa4(q, k, v):  # FA4 takes (B, T, H, hd): the transposed views of the same tensors
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
        checked("flash_attn.cute (FA4)", fa4, (q, k, v), g, want, want_grads, shape, flops, a.iters)


def checked(name, fn, qkv, g, want, want_grads, shape, flops, iters) -> None:
    """One row, its output and gradients first compared with cuDNN's (a failing kernel prints its error)."""
    try:
        got = fn(*qkv)
        grads = torch.autograd.grad(got, qkv, g)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip((got, *grads), (want, *want_grads)))
        report(f"{name} (max |diff| {diff:.1e})", shape, flops, Timed(lambda: fn(*qkv), iters),
               Timed(lambda: fn(*qkv).backward(g), iters))
    except Exception as e:  # noqa: BLE001 - one kernel failing must not hide the others
        print(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})", flush=True)


if __name__ == "__main__":
    main()
