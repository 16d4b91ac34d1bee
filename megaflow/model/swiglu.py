"""SiLU(gate) * up of a fused gate/up projection, with a one-pass backward.

`silu_mul(gate_up)`: gate_up (..., 2F) holds [gate; up] (layers.SwiGLU's fused GEMM output, under
tensor parallelism this rank's halves); the result (..., F) is F.silu(gate) * up, computed by the
same torch ops as before, so compiled forwards fuse it as they did.

Why the backward is ours: autograd's backward of `chunk` is a `cat` of dgate and dup, and inductor
lowers that cat of two pointwise inputs to one kernel over (..., 2F) that evaluates each half with
masked loads: dm and gate are read twice, 7 bf16 accesses per (gate, up) pair where 5 do (read dm,
gate, up; write dgate, dup). On h200_1b it took 16 x 427 us a step, twice its memory floor
(docs/benchmarks.md). `swiglu_backward` reads each input once and writes both halves of the
gate_up gradient in place: one Triton kernel on CUDA, an opaque op to torch.compile
(torch.library.custom_op), so inductor keeps it whole.

On other devices (and if Triton is missing) the op is autograd's own arithmetic in torch ops:
silu_backward(dm * up, gate) and dm * silu(gate), rounded where autograd rounds, so CPU runs are
unchanged bit for bit. The CUDA kernel computes in fp32 and rounds once (within bf16 rounding of
the reference; tools/device/step_micro.py checks it on the GPU).

Not here: the GEMMs around it (layers.SwiGLU), tensor parallelism (a rank's [gate; up] halves are
the same layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megaflow.model.triton_kernel import TritonKernel


def swiglu_backward_reference(dm: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d(gate_up) (..., 2F) of silu(gate) * up, from dm (..., F): autograd's arithmetic in torch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(dm * up, gate), dm * F.silu(gate)], dim=-1)




def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_backward_kernel(dm_ptr, gu_ptr, out_ptr, rows, F, dm_row, gu_row, out_row,
                               BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # (BLOCK_F,)
        mask = (r[:, None] < rows) & (c[None, :] < F)  # (BLOCK_R, BLOCK_F)
        dm = tl.load(dm_ptr + r[:, None] * dm_row + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g_off = r[:, None] * gu_row + c[None, :]  # gate's place in a row of [gate; up]; up's is F further
        g = tl.load(gu_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + g_off + F, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dgate = dm * u * s * (1.0 + g * (1.0 - s))  # d silu(g) / dg = s (1 + g (1 - s))
        dup = dm * g * s
        o_off = r[:, None] * out_row + c[None, :]
        tl.store(out_ptr + o_off, dgate.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + o_off + F, dup.to(out_ptr.dtype.element_ty), mask=mask)

    return swiglu_backward_kernel


_KERNEL = TritonKernel("one-pass SwiGLU backward kernel", _build_kernel)


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t as (rows, cols) with unit column stride: a view when its rows have one stride (inductor's
    padded rows too), else a copy."""
    t2 = t.reshape(-1, cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_backward_triton(dm: torch.Tensor, gate_up: torch.Tensor, block_r: int = 4, block_f: int = 512,
                           num_warps: int = 4) -> torch.Tensor:
    """swiglu_backward_reference as one Triton kernel (CUDA); computed in fp32, rounded once. Rows of
    any stride are read in place; the result is contiguous. Tiles of block_r rows x block_f columns
    (tools/device/tarflow_kernels.py times others)."""
    Fd = dm.shape[-1]
    dm2, gu2 = _rows(dm, Fd), _rows(gate_up, 2 * Fd)  # (rows, F), (rows, 2F)
    out = gate_up.new_empty(gate_up.shape)  # (..., 2F) contiguous, as the fake implementation says
    out2 = out.view(-1, 2 * Fd)
    rows = dm2.shape[0]
    grid = ((rows + block_r - 1) // block_r, (Fd + block_f - 1) // block_f)
    _KERNEL.get()[grid](dm2, gu2, out2, rows, Fd, dm2.stride(0), gu2.stride(0), out2.stride(0),
                        BLOCK_R=block_r, BLOCK_F=block_f, num_warps=num_warps)
    return out


# flexible_layout: inductor hands the inputs over in the layout it made them (on CUDA it pads row
# strides), rather than copying them into the strides seen at tracing; the kernel reads any row stride
@torch.library.custom_op("megaflow::swiglu_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def swiglu_backward(dm: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d(gate_up) of silu(gate) * up: the Triton kernel on CUDA, the reference elsewhere."""
    return _KERNEL.call(dm.is_cuda, lambda: swiglu_backward_triton(dm, gate_up),
                        lambda: swiglu_backward_reference(dm, gate_up))


@swiglu_backward.register_fake
def _(dm: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)  # (..., F) each
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dm: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(dm, gate_up)  # (..., 2F)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2F) [gate; up] -> (..., F) silu(gate) * up, its backward one pass (swiglu_backward)."""
    if not (torch.is_grad_enabled() and gate_up.requires_grad):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SiluMul.apply(gate_up)
