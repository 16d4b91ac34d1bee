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

Write mode (`write=True`; PlainEngine with train.bf16_grads, megaflow/optim.py MainWeights): one backward
per step, and each weight's gradient goes straight into its view of the flat bf16 gradient buffer:

              grad = dy^T x                    the first product of the step: torch.mm(..., out=grad), the GEMM
                                               autograd runs for nn.Linear, its output written in place
              grad += dy^T x                   a weight used again in the same forward (a shared layer):
                                               added in place (autograd would add the two bf16 products)

so no bf16 `.grad` is made and no copy moves it into the buffer afterwards. Which views were written this
step is `WRITTEN` (each fused weight's key, a number given at the swap), read by the custom op each time it
runs (eager, in a compiled backward where the op stays opaque, or while a CUDA graph captures the step, which
then replays the same choices) and emptied by MainWeights.zero_grad at the start of each step. A key, not the
view's address: AOTAutograd may hand the op a copy of the view (functionalization) and write it back after.

A backward that only asks for input gradients (torch.autograd.grad, e.g. a score-based denoise through the
stages) still adds into the main gradients: the next step's zeroing clears it, as it clears everything.
Not with data-parallel buckets reduced during backward (parallel.overlap at dp > 1): those wait for each
parameter's post-accumulate-grad hook, which a fused weight never fires (parallel/engine.py says so).
Not here: TP's column/row-parallel layers and FP8 linears (their own GEMMs); write mode under data parallelism
(its all-reduce sums the fp32 main gradients).
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)
WRITTEN: set = set()  # write mode: keys of the gradient views written since MainWeights.zero_grad last emptied it
_KEYS = itertools.count()  # write mode: each fused weight's key (unique in the process: engines share WRITTEN)
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


@torch.library.custom_op("megaflow::wgrad_write", mutates_args=("grad",))
def wgrad_write(grad: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, key: int) -> None:
    """grad (N, K), the weight's dtype, = dy^T x over all rows (dy (..., N), x (..., K)) the first time this step
    `key` comes, += after (see WRITTEN)."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # (M, N), (M, K)
    if key in WRITTEN:
        grad.addmm_(dy2.t(), x2)
    else:
        torch.mm(dy2.t(), x2, out=grad)
        WRITTEN.add(key)


@wgrad_write.register_fake
def _(grad, dy, x, key) -> None:
    return None


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, main_grad, key):
        x = x.to(weight.dtype)  # what autocast hands F.linear (fusion runs only with bf16 weights under bf16 autocast)
        ctx.save_for_backward(x, weight)
        # not saved: other micro-batches' backwards add to it in between (saved, autograd's version check fails)
        ctx.main_grad, ctx.has_bias, ctx.key = main_grad, bias is not None, key  # key: write mode's, or None
        return F.linear(x, weight, bias)  # (..., N)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype)
        if ctx.key is None:
            wgrad_accumulate(ctx.main_grad, dy, x)
        else:
            wgrad_write(ctx.main_grad, dy, x, ctx.key)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None  # (N,)
        return dy @ weight, None, db, None, None  # dx (..., K); the weight's gradient is in main_grad


class FusedWgradLinear(nn.Linear):
    """nn.Linear whose training backward adds dW into `main_grad` (fp32) instead of returning it (`write`: writes
it into `main_grad`, the weight's dtype, the step's first time)."""
    main_grad: torch.Tensor
    key = None  # write mode: this weight's key in WRITTEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return _FusedLinear.apply(x, self.weight, self.bias, self.main_grad, self.key)


def apply_wgrad_fusion(modules: list, main_grad_of, write: bool = False) -> list:
    """Swap every plain nn.Linear of `modules` whose trained weight is bf16 with an fp32 main gradient
    (`main_grad_of(weight)`: the fp32 tensor, or None where there is none) into a FusedWgradLinear.
    Returns the weights fused (their main gradients must be zeroed before each step's first backward).
    `write`: write mode; `main_grad_of(weight)` gives the weight's gradient view in its own dtype."""
    fused = []
    for module in modules:
        for lin in module.modules():
            if type(lin) is not nn.Linear or not lin.weight.requires_grad or lin.weight.dtype == torch.float32:
                continue
            main = main_grad_of(lin.weight)
            dtype = lin.weight.dtype if write else torch.float32
            if main is None or main.dtype != dtype or main.shape != lin.weight.shape or not main.is_contiguous():
                continue
            lin.__class__ = FusedWgradLinear
            lin.main_grad, lin.key = main, next(_KEYS) if write else None
            fused.append(lin.weight)
    return fused


def apply_grad_writes(modules: list, weights) -> list:
    """Write mode for `weights` (megaflow/optim.py MainWeights with bf16_grads): swap the plain bf16 linears of
    `modules` (before torch.compile) so that their GEMMs write into `weights`' flat bf16 gradient buffer, and tell
    `weights` which (wgrad_fused, their keys, the WRITTEN set it empties at each zero_grad). Returns the weights."""
    fused = apply_wgrad_fusion(modules, weights.grad_of, write=True)
    weights.wgrad_fused = {id(w) for w in fused}
    weights.wgrad_keys = {id(lin.weight): lin.key for module in modules for lin in module.modules()
                          if isinstance(lin, FusedWgradLinear) and lin.key is not None}
    weights.grads_written = WRITTEN
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
