"""One AdamW step over MainWeights' flat buffers in one pass (megaflow/optim.py, bf16 parameters with
fp32 main weights): read each fp32 gradient, main weight and the two moments once, write the main
weight, the moments and the bf16 model weight once. torch's fused AdamW plus the separate bf16
refresh copy read and write the main weights twice and run a multi-tensor kernel over ~200 tensors;
on h200_1b (0.9B parameters) they took ~10 ms of a ~180 ms step.

`adamw_reference` is the definition (torch ops, any device): torch's fused AdamW arithmetic
(aten/src/ATen/native/cuda/fused_adam_utils.cuh, ADAMW mode), with its `grad_scale` (the gradients
are divided by it: MainWeights' clipping) and `found_inf` (nothing is written when it is nonzero).
`adamw_triton` is the same on CUDA as one Triton kernel. The moments are views of flat buffers, so
torch's optimizer keeps owning its state (state_dict, load_state_dict, checkpoints unchanged);
MainWeights re-points them after a load.

Not here: the gradient norm (MainWeights.grad_norm, computed before the step), the step counts
(MainWeights increments torch's per-parameter `step` tensors, on the device).
"""
from __future__ import annotations

from typing import Optional

import torch


def bias_corrections(step: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """(2,) fp32 on step's device: lr's divisor 1 - beta1^step and sqrt(1 - beta2^step)."""
    s = step.float()
    return torch.stack([1 - torch.pow(beta1, s), (1 - torch.pow(beta2, s)).sqrt()])


@torch.no_grad()
def adamw_reference(main, grad, exp_avg, exp_avg_sq, param, decay, step, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                    found_inf: Optional[torch.Tensor] = None) -> None:
    """In place on 1-D buffers of n elements: main, grad, exp_avg, exp_avg_sq fp32, param (bf16) gets
    the new main weight, decay (bool) says where weight decay applies; step: the step count already
    incremented (0-d tensor)."""
    bc = bias_corrections(step, beta1, beta2)
    g = grad / grad_scale if grad_scale is not None else grad
    p = main - lr * weight_decay * decay.float() * main
    m = beta1 * exp_avg + (1 - beta1) * g
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    p = p - (lr / bc[0]) * m / (v.sqrt() / bc[1] + eps)
    if found_inf is not None:
        skip = found_inf.to(torch.bool)
        p, m, v = torch.where(skip, main, p), torch.where(skip, exp_avg, m), torch.where(skip, exp_avg_sq, v)
    main.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(main)


_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(main_ptr, grad_ptr, m_ptr, v_ptr, param_ptr, decay_ptr, bc_ptr, scale_ptr, inf_ptr, n,
                     lr, beta1, beta2, eps, weight_decay, BLOCK: tl.constexpr):
        if tl.load(inf_ptr) != 0:  # a skipped step writes nothing
            return
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        bc1 = tl.load(bc_ptr)
        bc2_sqrt = tl.load(bc_ptr + 1)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0) / tl.load(scale_ptr)
        p = tl.load(main_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        d = tl.load(decay_ptr + offs, mask=mask, other=0).to(tl.float32)
        p = p - lr * weight_decay * d * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(main_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)

    return adamw_kernel


@torch.no_grad()
def adamw_triton(main, grad, exp_avg, exp_avg_sq, param, decay, step, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                 found_inf: Optional[torch.Tensor] = None, block: int = 4096) -> None:
    """adamw_reference as one Triton kernel (CUDA tensors, contiguous)."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    one = torch.ones((), device=main.device)
    scale = grad_scale.float() if grad_scale is not None else one
    skip = found_inf.float() if found_inf is not None else torch.zeros((), device=main.device)
    n = main.numel()
    _kernel[(triton_cdiv(n, block),)](main, grad, exp_avg, exp_avg_sq, param, decay.view(torch.uint8),
                                     bias_corrections(step, beta1, beta2), scale, skip, n,
                                     lr, beta1, beta2, eps, weight_decay, BLOCK=block, num_warps=8)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
