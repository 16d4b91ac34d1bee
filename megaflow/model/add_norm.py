"""A residual add and the RMSNorm after it, x2 = x + delta, h = RMSNorm(x2), with a one-pass backward.

Inside a transformer block (`x = x + attn(...)`, then `mlp(post_attention_layernorm(x))`) the
norm's backward needs two reductions over different axes: per row (its input gradient) and per
column (its weight gradient, a sum over all tokens). Compiled, inductor writes them as separate
passes, so the norm's output gradient and its input are read twice (and the input recomputed from
x + delta). `rms_norm_backward` does both in one pass: each program walks a slab of rows, writes
their input gradient (plus the residual stream's gradient: the add and the norm share one pass) and
keeps a running column sum for the weight, written once as one partial row; the partials' sum is a
(programs, D) reduction. One Triton kernel on CUDA, an opaque op to torch.compile; its forward is
plain torch ops that inductor fuses as before (x + delta and the norm in one kernel).

On other devices (and if Triton fails) the op is the same arithmetic in torch ops.

Not here: the RMSNorm module (layers.RMSNorm: its weight and eps are used), the norm at a block's
entry (its input is the previous block's output; inductor already fuses its backward with the
residual gradient's add).
"""
from typing import Optional, Tuple

import torch

from megaflow.model.triton_kernel import TritonKernel


def rms_norm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple:
    """(h in x2's dtype, rstd (..., 1) fp32): as layers.RMSNorm, F.rms_norm in fp32, cast back."""
    xf = x2.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x2.dtype), rstd


def rms_norm_backward_reference(dh, x2, rstd, weight, dres) -> tuple:
    """(dx (N, D) in x2's dtype, dw (D,) fp32): the gradient of x2 (norm path + dres), the weight's."""
    xhat = x2.float() * rstd  # (N, D)
    wdy = dh.float() * weight.float()
    c = (xhat * wdy).mean(-1, keepdim=True)  # (N, 1)
    dx = (wdy - xhat * c) * rstd + dres.float()
    return dx.to(x2.dtype), (dh.float() * xhat).sum(0)


@torch.library.custom_op("megaflow::rms_norm_backward", mutates_args=())
def rms_norm_backward(dh: torch.Tensor, x2: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                      dres: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """dh, x2, dres (N, D), rstd (N, 1) fp32, weight (D,) -> dx (N, D), dw (D,) fp32."""
    return _KERNEL.call(dh.is_cuda, lambda: _triton_backward(dh, x2, rstd, weight, dres),
                        lambda: rms_norm_backward_reference(dh, x2, rstd, weight, dres))


@rms_norm_backward.register_fake
def _(dh, x2, rstd, weight, dres):
    return torch.empty_like(x2), weight.new_empty(weight.shape, dtype=torch.float32)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps: float):
        x2 = x + delta  # (..., D)
        h, rstd = rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, rstd, weight)
        return x2, h

    @staticmethod
    def backward(ctx, dx2, dh):
        x2, rstd, weight = ctx.saved_tensors
        D = x2.shape[-1]
        dx, dw = rms_norm_backward(dh.reshape(-1, D), x2.reshape(-1, D), rstd.reshape(-1, 1), weight,
                                   dx2.reshape(-1, D))
        dx = dx.view(x2.shape)
        return dx, dx, dw.to(weight.dtype), None


# torch.compile of _AddRMSNorm gives x a zero gradient on torch 2.11 (the H200 image's: the compiled
# test's dx was all zeros, delta's returned as the same tensor or as a view alike); right on 2.13.
# Compiled regions on older torch build the add and the norm from plain ops (inductor's backward).
COMPILE_SAFE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple:
    """x, delta (..., D) -> (x + delta, RMSNorm(x + delta) with `weight`, `eps`)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad or weight.requires_grad)
    if not needs_grad or (not COMPILE_SAFE and torch.compiler.is_compiling()):
        x2 = x + delta
        return x2, rms_norm_forward(x2, weight, eps)[0]
    return _AddRMSNorm.apply(x, delta, weight, eps)


# ----- Triton (CUDA) ---------------------------------------------------------------------------------
ROWS = 4  # rows per inner step of a program


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def backward_kernel(dh_ptr, x_ptr, rstd_ptr, w_ptr, dres_ptr, dx_ptr, dw_ptr, N, D, rows_per_program,
                        BD: tl.constexpr, BR: tl.constexpr):
        p = tl.program_id(0)
        c = tl.arange(0, BD)  # (BD,) columns
        cm = c < D
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        dw = w * 0.0  # (BD,) fp32 running column sum (not tl.zeros: triton's CPU interpreter lacks it)
        start = p * rows_per_program
        for r0 in range(start, start + rows_per_program, BR):
            r = r0 + tl.arange(0, BR)  # (BR,)
            m = (r[:, None] < N) & cm[None, :]  # (BR, BD)
            off = r[:, None].to(tl.int64) * D + c[None, :]
            dh = tl.load(dh_ptr + off, mask=m, other=0.0).to(tl.float32)
            xhat = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + r, mask=r < N, other=0.0)  # (BR,)
            xhat = xhat * rstd[:, None]
            wdy = dh * w[None, :]
            cdot = tl.sum(xhat * wdy, axis=1) / D  # (BR,)
            dx = (wdy - xhat * cdot[:, None]) * rstd[:, None]
            dx += tl.load(dres_ptr + off, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
            dw += tl.sum(dh * xhat, axis=0)
        tl.store(dw_ptr + p * D + c, dw, mask=cm)

    return backward_kernel


_KERNEL = TritonKernel("RMSNorm backward kernel", _build_kernel)


def _triton_backward(dh, x2, rstd, weight, dres) -> tuple:
    dh, x2, dres, rstd = dh.contiguous(), x2.contiguous(), dres.contiguous(), rstd.float().contiguous()
    N, D = x2.shape
    programs = _programs(dh.device)
    rows = max(ROWS, -(-N // programs))
    rows = -(-rows // ROWS) * ROWS  # a multiple of the inner step
    programs = -(-N // rows)
    dx = torch.empty_like(x2)
    partial = torch.empty(programs, D, device=dh.device, dtype=torch.float32)
    _KERNEL.get()[(programs,)](dh, x2, rstd, weight.contiguous(), dres, dx, partial, N, D, rows,
                               BD=_pow2(D), BR=ROWS, num_warps=4)
    return dx, partial.sum(0)


_sms: Optional[int] = None


def _programs(device) -> int:
    global _sms
    if _sms is None:
        _sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return 8 * _sms  # a few row slabs per SM: enough loads in flight for a memory-bound pass


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()
