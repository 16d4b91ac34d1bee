"""The FP8 cast and the one-read cast + cast-transpose (issue 19), for megaflow/fp8.py.

`fp8_cast(t, scale, dtype)` is THE cast of the FP8 path: t * scale in fp32, clamped to the format's
largest finite value, rounded to nearest-even (the scale is a 0-d fp32 tensor: (largest FP8) / amax).

`fp8_cast_t(t, scale, e5m2)` gives the same cast in both layouts, q (M, K) and q^T (K, M) contiguous,
from ONE read of t: Hopper's FP8 GEMMs read both operands K-major, so each FP8 linear needs W row-major
(forward) and transposed (dx = dy W), and dy row-major (dx) and transposed (dW = dy^T x). Without it,
inductor fuses the cast with a one-byte transposed store (dy; ~1.9 TB/s on the H200) or a second kernel
re-reads the FP8 copy to transpose it (W in the backward). On a GPU it is a hand-written Triton kernel
(one bf16 tile in registers, the row-major tile stored, the transposed tile stored through shared
memory); elsewhere the reference `fp8_cast` + ATen's transpose. Both give the same bytes (FP8 casts of
the same values with the same scale are deterministic; tests/train/test_fp8_torch.py on the CPU,
tools/device/fp8_kernel_check.py on the GPU). An opaque custom op: torch.compile keeps it as one call
(its input materialised, its outputs saved for the backward as they are).

Not here: amaxes and scales (megaflow/fp8.py computes them inside the compiled graphs, where inductor
fuses the reductions into the producers of the tensors).
"""
from __future__ import annotations

import functools

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TILE = (64, 128, 4)  # rows, columns, warps of one program (tools/device/fp8_kernel_check.py times others)


def fp8_cast(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t scaled by `scale` (0-d fp32) into `dtype`'s range, saturating at its largest finite value."""
    fmax = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype)


@torch.library.custom_op("megaflow::fp8_cast_t", mutates_args=())
def fp8_cast_t(t: torch.Tensor, scale: torch.Tensor, e5m2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, q^T): `fp8_cast(t, scale, e5m2 ? E5M2 : E4M3)` row-major (M, K) and transposed (K, M), both
    contiguous, from one read of t (M, K)."""
    dtype = E5M2 if e5m2 else E4M3
    if t.device.type != "cuda":
        q = fp8_cast(t, scale, dtype)
        return q, q.t().contiguous()
    return cast_t_triton(t, scale, dtype)


@fp8_cast_t.register_fake
def _(t: torch.Tensor, scale: torch.Tensor, e5m2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = E5M2 if e5m2 else E4M3
    return t.new_empty(t.shape, dtype=dtype), t.new_empty(t.shape[1], t.shape[0], dtype=dtype)  # (M, K), (K, M)


def cast_t_triton(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, tile: tuple = TILE) -> tuple:
    """The Triton kernel behind `fp8_cast_t` on a GPU (t: (M, K), contiguous or made so)."""
    import triton
    t = t.contiguous()
    m, k = t.shape
    q = torch.empty((m, k), dtype=dtype, device=t.device)  # (M, K)
    qt = torch.empty((k, m), dtype=dtype, device=t.device)  # (K, M)
    bm, bk, warps = tile
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _kernel()[grid](t, q, qt, scale, m, k, torch.finfo(dtype).max, BM=bm, BK=bk, E5M2=dtype == E5M2,
                    num_warps=warps)
    return q, qt


@functools.cache
def _kernel():
    """The jitted kernel, built on first use (Triton is imported only where a GPU runs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_t_kernel(x_ptr, q_ptr, qt_ptr, scale_ptr, M, K, fmax, BM: tl.constexpr, BK: tl.constexpr,
                      E5M2: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)  # (BK,)
        r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
        inside = (rows[:, None] < M) & (cols[None, :] < K)  # (BM, BK)
        x = tl.load(x_ptr + r64[:, None] * K + c64[None, :], mask=inside, other=0.0)
        y = tl.clamp(x.to(tl.float32) * tl.load(scale_ptr), -fmax, fmax, propagate_nan=tl.PropagateNan.ALL)
        if E5M2:  # round to nearest even, as torch's cast
            q = y.to(tl.float8e5)
        else:
            q = y.to(tl.float8e4nv)
        tl.store(q_ptr + r64[:, None] * K + c64[None, :], q, mask=inside)
        # (BK, BM): the transposed tile, stored along its rows (Triton moves it through shared memory)
        inside_t = (cols[:, None] < K) & (rows[None, :] < M)  # (BK, BM)
        tl.store(qt_ptr + c64[:, None] * M + r64[None, :], tl.trans(q), mask=inside_t)

    return cast_t_kernel
