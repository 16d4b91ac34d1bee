"""Gradient-accumulation fusion (Megatron's `gradient_accumulation_fusion`; issue 17, the PP2 row): each
linear's weight-gradient GEMM accumulates straight into its fp32 main gradient (megaflow/optim.py
MainWeights), so no bf16 `.grad` is written and no flush kernel adds it to the fp32 one after every
micro-batch's backward.

    forward   y = x W^T (+ b)                  as nn.Linear (bf16)
    backward  dx = dy W                        as nn.Linear
              main_grad += dy^T x              bf16 inputs, fp32 accumulation and fp32 C (cuBLAS beta = 1:
                                               torch.addmm(..., out_dtype=float32, out=main_grad)); W.grad stays None
              db = sum of dy over rows         as nn.Linear (a bias's gradient takes the usual path)

`apply_wgrad_fusion` swaps the plain `nn.Linear`s of the stages from outside (the model stays plain
PyTorch; state-dict names and parameters untouched, as megaflow/fp8.py's swap), after MainWeights built
the fp32 buffers and before regional torch.compile, whose graphs then hold the accumulation as one opaque
op (`megaflow::wgrad_accumulate`, a mutation of the main gradient in the compiled backward; CUDA graphs
capture its launch). The main gradients of a fused weight are zeroed at the start of each step
(MainWeights.zero_grad), since every micro-batch adds. Numbers: the fp32 sum over micro-batches of the
fp32 products (the unfused path rounds each micro-batch's product to bf16 first); the CPU runs the same
sum as an fp32 GEMM of the bf16 inputs (torch's `out_dtype` GEMMs are CUDA only).

A backward that only asks for input gradients (torch.autograd.grad, e.g. a score-based denoise through the
stages) still adds into the main gradients: the next step's zeroing clears it, as it clears everything.
Not with data-parallel buckets reduced during backward (parallel.overlap at dp > 1): those wait for each
parameter's post-accumulate-grad hook, which a fused weight never fires (parallel/engine.py says so).
Not here: TP's column/row-parallel layers and FP8 linears (their own GEMMs), the one-backward PlainEngine.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)
_ADDMM_DTYPE = [None]  # whether torch.addmm(fp32 C, bf16, bf16, out_dtype=fp32, out=C) runs here: None until tried


@torch.library.custom_op("megaflow::wgrad_accumulate", mutates_args=("main_grad",))
def wgrad_accumulate(main_grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad (N, K) fp32 += dy^T x over all rows: dy (..., N), x (..., K), both bf16."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, N), (M, K)
    if main_grad.is_cuda and _ADDMM_DTYPE[0] is not False:
        try:  # one cuBLAS GEMM: fp32 accumulation, C read and written in fp32 (beta = 1)
            torch.addmm(main_grad, dy2.t(), x2, out_dtype=torch.float32, out=main_grad)
            _ADDMM_DTYPE[0] = True
            return
        except (RuntimeError, TypeError) as e:  # an older torch: the bf16 product added (the unfused numbers)
            if _ADDMM_DTYPE[0]:
                raise
            _ADDMM_DTYPE[0] = False
            log.warning("gradient-accumulation fusion: torch %s has no fp32-accumulating bf16 GEMM into an fp32 "
                        "C (%s); each weight gradient is computed in bf16 and added instead (no speed-up)",
                        torch.__version__, str(e).splitlines()[0][:160])
    if main_grad.is_cuda:
        main_grad.add_(dy2.t() @ x2)
    else:
        main_grad.addmm_(dy2.t().float(), x2.float())  # (N, K): the fp32 sum the CUDA GEMM computes


@wgrad_accumulate.register_fake
def _(main_grad, dy, x) -> None:
    return None


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, main_grad):
        x = x.to(weight.dtype)  # what autocast hands F.linear (fusion runs only with bf16 weights under bf16 autocast)
        ctx.save_for_backward(x, weight)
        # not saved: other micro-batches' backwards add to it in between (saved, autograd's version check fails)
        ctx.main_grad, ctx.has_bias = main_grad, bias is not None
        return F.linear(x, weight, bias)  # (..., N)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype)
        wgrad_accumulate(ctx.main_grad, dy, x)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None  # (N,)
        return dy @ weight, None, db, None  # dx (..., K); the weight's gradient is in main_grad


class FusedWgradLinear(nn.Linear):
    """nn.Linear whose training backward adds dW into `main_grad` (fp32) instead of returning it."""
    main_grad: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return _FusedLinear.apply(x, self.weight, self.bias, self.main_grad)


def apply_wgrad_fusion(modules: list, main_grad_of) -> list:
    """Swap every plain nn.Linear of `modules` whose trained weight is bf16 with an fp32 main gradient
    (`main_grad_of(weight)`: the fp32 tensor, or None where there is none) into a FusedWgradLinear.
    Returns the weights fused (their main gradients must be zeroed before each step's first backward)."""
    fused = []
    for module in modules:
        for lin in module.modules():
            if type(lin) is not nn.Linear or not lin.weight.requires_grad or lin.weight.dtype == torch.float32:
                continue
            main = main_grad_of(lin.weight)
            if main is None or main.dtype != torch.float32 or main.shape != lin.weight.shape:
                continue
            lin.__class__ = FusedWgradLinear
            lin.main_grad = main
            fused.append(lin.weight)
    return fused


def fusion_wanted(mode: str, mixed: bool, micro_batches: int, device: torch.device, dp: int, overlap: bool,
                  tp: int = 1) -> bool:
    """parallel.grad_accum_fusion: 'auto' fuses on CUDA with bf16 weights, several micro-batches and neither data
    nor tensor parallelism (TP keeps its measured path: the plain linears it leaves are few); 'on' wherever it works
    (the CPU too); 'off' never. An error where 'on' cannot work."""
    if mode == "off":
        return False
    if mode == "on":
        if not mixed:
            raise ValueError("parallel.grad_accum_fusion=on accumulates bf16 weight gradients into fp32 main ones: "
                             "set train.param_dtype=bf16 (with train.dtype=bf16), or grad_accum_fusion=off")
        if dp > 1 and overlap:
            raise ValueError(f"parallel.grad_accum_fusion=on leaves the weights' .grad empty, so the data-parallel "
                             f"buckets reduced during backward (parallel.overlap at dp={dp}) never see them ready: "
                             f"set parallel.overlap=false or grad_accum_fusion=off")
        return True
    return mixed and device.type == "cuda" and micro_batches > 1 and dp == 1 and tp == 1
