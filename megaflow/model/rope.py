"""Rotary position embeddings (HF's rotate-half layout) and RoPE on a fused QKV projection's output.

`rope_tables` / `apply_rope` are the definition. `qkv_rope` splits the QKV GEMM's output
(B, T, Hq + 2 Hkv, hd) into q, k (rotated) and v, each (B, H, T, hd) in (B, T, H, hd) memory order,
with its own backward; on CUDA each direction is one Triton kernel, at the memory floor:
  forward   reads q and k of qkv once, writes rotated q and k once (v stays a view of qkv);
  backward  reads dq, dk, dv once and writes the QKV gradient once, un-rotated, in qkv's layout.
Compiled (inductor) instead, RoPE's backward and the reassembly of dq/dk/dv into the QKV gradient
were two passes and a temporary: ~0.26 ms of a 3.6 ms layer at ml-tarflow's shape
(docs/benchmarks.md). On CPU (and in tests) the op runs `apply_rope` itself and its backward is
the same math in torch ops (so does CUDA if Triton fails, with a warning). torch.compile sees an
autograd.Function around two opaque ops (torch.library.custom_op); CUDA graphs capture their launches.

Not here: the tables' positions (the callers' position_ids), attention itself (masks.attend).
"""
from typing import Tuple

import torch

from megaflow.model.triton_kernel import TritonKernel


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos/sin tables for positions (B, T) -> each (B, 1, T, head_dim), HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dL/dx of apply_rope given dL/dy: cos * dy + R^T (sin * dy), R^T [a; b] = [b; -a]."""
    half = dy.shape[-1] // 2
    s = dy * sin
    return dy * cos + torch.cat([s[..., half:], -s[..., :half]], dim=-1)


# ----- the fused op ---------------------------------------------------------------------------------
def _heads_major(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, hd) -> a fresh (B, H, T, hd) of the same values in (B, T, H, hd) memory order."""
    return x.clone(memory_format=torch.contiguous_format).transpose(1, 2)


@torch.library.custom_op("megaflow::rope_qk", mutates_args=())
def _rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int,
             n_kv: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _KERNELS.call(qkv.is_cuda, lambda: _triton_forward(qkv, cos, sin, n_q, n_kv),
                         lambda: _rope_qk_reference(qkv, cos, sin, n_q, n_kv))


def _rope_qk_reference(qkv, cos, sin, n_q: int, n_kv: int) -> tuple:
    qk = apply_rope(qkv[:, :, :n_q + n_kv].transpose(1, 2).float(), cos.float(), sin.float()).to(qkv.dtype)
    return _heads_major(qk[:, :n_q].transpose(1, 2)), _heads_major(qk[:, n_q:].transpose(1, 2))


@_rope_qk.register_fake
def _(qkv, cos, sin, n_q, n_kv):
    B, T, _, hd = qkv.shape
    return tuple(qkv.new_empty(B, T, h, hd).transpose(1, 2) for h in (n_q, n_kv))


@torch.library.custom_op("megaflow::qkv_rope_backward", mutates_args=())
def _qkv_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    return _KERNELS.call(dq.is_cuda, lambda: _triton_backward(dq, dk, dv, cos, sin),
                         lambda: _qkv_rope_backward_reference(dq, dk, dv, cos, sin))


def _qkv_rope_backward_reference(dq, dk, dv, cos, sin) -> torch.Tensor:
    dqk = rope_backward(torch.cat([dq, dk], dim=1).float(), cos.float(), sin.float()).to(dq.dtype)
    return torch.cat([dqk, dv], dim=1).transpose(1, 2).contiguous()  # (B, T, Hq + 2 Hkv, hd)


@_qkv_rope_backward.register_fake
def _(dq, dk, dv, cos, sin):
    B, Hq, T, hd = dq.shape
    return dq.new_empty(B, T, Hq + dk.shape[1] + dv.shape[1], hd)


class _QKVRope(torch.autograd.Function):
    """q, k rotated (fresh), v a view of qkv; the backward writes the whole QKV gradient at once."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q: int, n_kv: int):
        ctx.save_for_backward(cos, sin)
        q, k = _rope_qk(qkv, cos, sin, n_q, n_kv)
        return q, k, qkv[:, :, n_q + n_kv:].transpose(1, 2)  # v: (B, n_kv, T, hd)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return _qkv_rope_backward(dq, dk, dv, cos, sin), None, None, None, None


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int) -> tuple:
    """qkv (B, T, n_q + 2 n_kv, hd), tables (B|1, 1, T, hd) -> q (B, n_q, T, hd), k, v (B, n_kv, T, hd):
    q and k rotated (computed in fp32, returned in qkv's dtype), v a view of qkv. All three keep qkv's
    (B, T, H, hd) memory order, so attention's output (cuDNN's follows q's) reshapes to (B, T, H hd)
    without a copy and its gradient reaches cuDNN's backward in the order it expects."""
    B, T, H, hd = qkv.shape
    if H != n_q + 2 * n_kv or hd % 2 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv_rope: qkv {tuple(qkv.shape)} (last stride {qkv.stride(-1)}) is not "
                         f"(B, T, {n_q} + 2 x {n_kv} heads, even head_dim) with a contiguous last dim")
    cos, sin = (t.expand(-1, 1, T, hd) if t.shape[2] == 1 else t for t in (cos, sin))  # decode: one position
    if cos.stride() != sin.stride():  # the kernels index both tables with cos's strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return _QKVRope.apply(qkv, cos, sin, n_q, n_kv)


# ----- Triton (CUDA) ---------------------------------------------------------------------------------
BLOCK_T = 64  # tokens per program: (64, hd) tiles; a token's head is hd contiguous elements


def _build_kernels() -> tuple:
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, T, n_q, n_kv,
                       sxb, sxt, sxh, scb, sct, HALF: tl.constexpr, BT: tl.constexpr):
        # program (t-block, head, b): x[b, tblock, head, :] rotated -> q or k [b, tblock, head', :]
        tb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = tb * BT + tl.arange(0, BT)[:, None]  # (BT, 1)
        d = tl.arange(0, HALF)[None, :]  # (1, HALF)
        rows = t < T
        b64 = b.to(tl.int64)
        src = x_ptr + b64 * sxb + t * sxt + h * sxh + d
        x1 = tl.load(src, mask=rows, other=0.0).to(tl.float32)  # (BT, HALF) first halves
        x2 = tl.load(src + HALF, mask=rows, other=0.0).to(tl.float32)
        tab = b64 * scb + t * sct + d
        c1 = tl.load(cos_ptr + tab, mask=rows, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tab + HALF, mask=rows, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tab, mask=rows, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tab + HALF, mask=rows, other=0.0).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        if h < n_q:
            dst = q_ptr + ((b64 * T + t) * n_q + h) * (2 * HALF) + d
        else:
            dst = k_ptr + ((b64 * T + t) * n_kv + h - n_q) * (2 * HALF) + d
        tl.store(dst, y1.to(q_ptr.dtype.element_ty), mask=rows)
        tl.store(dst + HALF, y2.to(q_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def backward_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dx_ptr, T, n_q, n_kv,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, scb, sct,
                        HALF: tl.constexpr, BT: tl.constexpr):
        # program (t-block, head, b): dq/dk/dv[b, head', tblock, :] -> dx[b, tblock, head, :] (contiguous)
        tb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = tb * BT + tl.arange(0, BT)[:, None]  # (BT, 1)
        d = tl.arange(0, HALF)[None, :]  # (1, HALF)
        rows = t < T
        b64 = b.to(tl.int64)
        if h < n_q:
            src = dq_ptr + b64 * sqb + h * sqh + t * sqt + d
        elif h < n_q + n_kv:
            src = dk_ptr + b64 * skb + (h - n_q) * skh + t * skt + d
        else:
            src = dv_ptr + b64 * svb + (h - n_q - n_kv) * svh + t * svt + d
        g1 = tl.load(src, mask=rows, other=0.0).to(tl.float32)  # (BT, HALF)
        g2 = tl.load(src + HALF, mask=rows, other=0.0).to(tl.float32)
        if h < n_q + n_kv:
            tab = b64 * scb + t * sct + d
            c1 = tl.load(cos_ptr + tab, mask=rows, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + tab + HALF, mask=rows, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + tab, mask=rows, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + tab + HALF, mask=rows, other=0.0).to(tl.float32)
            r1 = g1 * c1 + g2 * s2
            r2 = g2 * c2 - g1 * s1
        else:
            r1, r2 = g1, g2
        H = n_q + 2 * n_kv
        dst = dx_ptr + ((b64 * T + t) * H + h) * (2 * HALF) + d
        tl.store(dst, r1.to(dx_ptr.dtype.element_ty), mask=rows)
        tl.store(dst + HALF, r2.to(dx_ptr.dtype.element_ty), mask=rows)

    return forward_kernel, backward_kernel


_KERNELS = TritonKernel("RoPE/QKV Triton kernels", _build_kernels)  # (forward, backward)


def _grid(B: int, T: int, H: int) -> tuple:
    return ((T + BLOCK_T - 1) // BLOCK_T, H, B)


def _table_strides(t: torch.Tensor) -> tuple:
    """(batch, token) element strides of a (B|1, 1, T, hd) table; batch 0 when broadcast."""
    if t.stride(-1) != 1:
        raise ValueError(f"qkv_rope: a RoPE table of shape {tuple(t.shape)} needs a contiguous last dim")
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(2)


def _triton_forward(qkv, cos, sin, n_q, n_kv) -> tuple:
    B, T, H, hd = qkv.shape
    q, k = (qkv.new_empty(B, T, h, hd) for h in (n_q, n_kv))
    _KERNELS.get()[0][_grid(B, T, n_q + n_kv)](
        qkv, cos, sin, q, k, T, n_q, n_kv, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        *_table_strides(cos), HALF=hd // 2, BT=BLOCK_T, num_warps=4)
    return q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd) in (B, T, H, hd) order


def _triton_backward(dq, dk, dv, cos, sin) -> torch.Tensor:
    B, n_q, T, hd = dq.shape
    n_kv = dk.shape[1]
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    dx = dq.new_empty(B, T, n_q + 2 * n_kv, hd)
    _KERNELS.get()[1][_grid(B, T, n_q + 2 * n_kv)](
        dq, dk, dv, cos, sin, dx, T, n_q, n_kv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        *_table_strides(cos), HALF=hd // 2, BT=BLOCK_T, num_warps=4)
    return dx
