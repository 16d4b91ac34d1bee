"""One AdamW step over MainWeights' flat buffers in one pass (megaflow/optim.py, bf16 parameters with
fp32 main weights): read each fp32 gradient, main weight and the two moments once, write the main
weight, the moments and the bf16 model weight once. torch's fused AdamW plus the separate bf16
refresh copy read and write the main weights twice and run a multi-tensor kernel over ~200 tensors;
on h200_1b (0.9B parameters) they took ~10 ms of a ~180 ms step.

The gradient may be fp32 (the main gradients) or bf16 (MainWeights' bf16_grads: one backward per step, so
the bf16 GEMM outputs themselves): it is upcast to fp32 as it is read, the rest of the arithmetic unchanged.
The moments may be fp32 or bf16 (train.moments_dtype, as Megatron's precision-aware optimizer and
DeepSeek-V3 keep them): read as fp32, updated in fp32, rounded to nearest once as they are stored; the
main weights stay fp32. Per parameter a step then moves 20 bytes instead of 28.

`adamw_reference` is the definition (torch ops, any device): torch's fused AdamW arithmetic
(aten/src/ATen/native/cuda/fused_adam_utils.cuh, ADAMW mode), with its `grad_scale` (the gradients
are divided by it: MainWeights' clipping) and `found_inf` (nothing is written when it is nonzero).
`adamw_triton` is the same on CUDA as one Triton kernel. The moments are views of flat buffers, so
torch's optimizer keeps owning its state (state_dict, load_state_dict, checkpoints unchanged);
MainWeights re-points them after a load.

The learning rate may be a 0-d device tensor (as train.step_graph=on keeps it), like the step count;
both enter through `step_coefficients`, computed on the device, so nothing is read on the host and
the step can be captured in a CUDA graph. The kernel is a `TritonKernel` (megaflow/model/triton_kernel.py):
built at its first use, given up for torch's fused AdamW if it fails (MainWeights' fallback), and
re-raised, named, if it fails inside a graph capture.

Not here: the gradient norm (MainWeights.grad_norm, computed before the step), the step counts
(MainWeights increments torch's per-parameter `step` tensors, on the device).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from megaflow.model.triton_kernel import TritonKernel

LR = Union[float, torch.Tensor]  # a host float, or a 0-d tensor on the buffers' device (read there, not on the host)


def step_coefficients(step: torch.Tensor, lr: LR, beta1: float, beta2: float, weight_decay: float) -> torch.Tensor:
    """(3,) fp32 on step's device: the step size lr / (1 - beta1^step), the second moment's divisor
    sqrt(1 - beta2^step), and the decay factor lr * weight_decay. `step`: the count already incremented."""
    s = step.float()
    lr = lr.to(s.device, torch.float32) if torch.is_tensor(lr) else torch.full((), lr, device=s.device)
    return torch.stack([lr / (1 - torch.pow(beta1, s)), (1 - torch.pow(beta2, s)).sqrt(), lr * weight_decay])


@torch.no_grad()
def adamw_reference(main, grad, exp_avg, exp_avg_sq, param, decay, step, lr: LR, beta1: float, beta2: float,
                    eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                    found_inf: Optional[torch.Tensor] = None) -> None:
    """In place on 1-D buffers of n elements: main fp32, exp_avg and exp_avg_sq fp32 or bf16 (train.moments_dtype:
    read as fp32, the arithmetic in fp32, rounded once as stored), grad fp32 or bf16, param (bf16) gets the new
    main weight, decay (bool) says where weight decay applies; step: the step count already incremented (0-d
    tensor); lr a float or a 0-d tensor."""
    size, bc2_sqrt, decay_factor = step_coefficients(step, lr, beta1, beta2, weight_decay)
    g = grad.float()
    g = g / grad_scale if grad_scale is not None else g
    p = main - decay_factor * decay.float() * main
    m0, v0 = exp_avg.float(), exp_avg_sq.float()  # no-ops for fp32 moments
    m = beta1 * m0 + (1 - beta1) * g
    v = beta2 * v0 + (1 - beta2) * g * g
    p = p - size * m / (v.sqrt() / bc2_sqrt + eps)
    if found_inf is not None:
        skip = found_inf.to(torch.bool)
        p, m, v = torch.where(skip, main, p), torch.where(skip, m0, m), torch.where(skip, v0, v)
    main.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(main)


BLOCK = 4096  # elements a program of the flat AdamW kernel


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_kernel(main_ptr, grad_ptr, m_ptr, v_ptr, param_ptr, decay_ptr, kind_ptr, coef_ptr, scale_ptr, inf_ptr,
                     n, beta1, beta2, eps, BLOCK: tl.constexpr):
        if tl.load(inf_ptr) != 0:  # a skipped step writes nothing
            return
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        size = tl.load(coef_ptr)  # step_coefficients, computed on the device (the lr may be a device tensor)
        bc2_sqrt = tl.load(coef_ptr + 1)
        decay_factor = tl.load(coef_ptr + 2)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) / tl.load(scale_ptr)
        p = tl.load(main_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # fp32 or bf16 moments (train.moments_dtype)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        kind = tl.load(kind_ptr + pid)  # the block's decay: 0 none, 1 all, 2 mixed (only then is the mask read)
        d = tl.load(decay_ptr + offs, mask=mask & (kind == 2), other=0).to(tl.float32)
        d = tl.where(kind == 2, d, kind.to(tl.float32))
        p = p - decay_factor * d * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(main_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)

    return adamw_kernel


KERNEL = TritonKernel("flat AdamW kernel", _build_kernel)


@torch.no_grad()
def adamw_triton(main, grad, exp_avg, exp_avg_sq, param, decay, step, lr: LR, beta1: float, beta2: float,
                 eps: float, weight_decay: float, grad_scale: Optional[torch.Tensor] = None,
                 found_inf: Optional[torch.Tensor] = None, block: int = BLOCK,
                 coef: Optional[torch.Tensor] = None, kinds: Optional[torch.Tensor] = None) -> None:
    """adamw_reference as one Triton kernel (CUDA tensors, contiguous). `coef`: step_coefficients when the caller
    made them already (one step over several ranges of the buffers: parallel/dist_optimizer.py); `kinds`:
    decay_kinds(decay, block), made once by the caller (else here, a pass over the mask each call)."""
    scale = grad_scale.float() if grad_scale is not None else torch.ones((), device=main.device)
    skip = found_inf.float() if found_inf is not None else torch.zeros((), device=main.device)
    coef = step_coefficients(step, lr, beta1, beta2, weight_decay) if coef is None else coef
    n = main.numel()
    KERNEL.get()[(triton_cdiv(n, block),)](main, grad, exp_avg, exp_avg_sq, param, decay.view(torch.uint8),
                                         decay_kinds(decay, block) if kinds is None else kinds, coef, scale, skip,
                                         n, beta1, beta2, eps,
                                         BLOCK=block, num_warps=8)


def decay_kinds(decay: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(cdiv(n, block),) uint8 of a 1-D bool decay mask: each block of `block` elements 0 (no decay), 1 (all decay)
    or 2 (mixed: the kernel reads the mask there). Weights are thousands of blocks long, so only a block that
    straddles two of them is mixed and the kernel reads ~none of the mask's n bytes (0.9 GB a step at 0.9B
    parameters). A mask is fixed for a run, so callers make this once per mask (slice) and pass it as `kinds`."""
    n = decay.numel()
    padded = torch.zeros(triton_cdiv(n, block) * block, dtype=torch.uint8, device=decay.device)
    padded[:n] = decay.view(torch.uint8)
    blocks = padded.view(-1, block)
    any_, all_ = blocks.amax(1), blocks.amin(1)
    tail = n % block  # the last block's padding is not decay: judge it by its real elements
    if tail:
        all_[-1] = decay[n - tail:].all()
    return torch.where(any_ == 0, 0, torch.where(all_ == 1, 1, 2)).to(torch.uint8)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
