"""Async tensor parallelism (issue 17, `parallel.async_tp`). Under sequence parallelism: the all-gather
of a column-parallel layer's T-sharded input overlapped with that layer's GEMM, and the
reduce-scatter of a row-parallel layer's output overlapped with its GEMM (Megatron's / torchtitan's
async TP). Same math as gather_seq -> linear and linear -> reduce_scatter_seq (parallel/comm.py).
Without sequence parallelism: `copy_linear`, the column-parallel layer on a replicated input whose
backward starts the all-reduce of the input gradient and computes the weight gradient while it is
in flight (Megatron's async gradient all-reduce); in eager and in compiled graphs alike.

Two implementations under SP, picked per call by the layers (parallel/layers.py):
  compiled  (torch.compile on CUDA with NCCL) the layers emit the plain functional collectives in
            "rows" order (comm.gather_rows / scatter_rows: along dim 0, no re-layout between the
            collective and its GEMM) and `enable_async_tp` turns on inductor's micro-pipeline TP pass
            (`torch._inductor.config._micro_pipeline_tp`), which rewrites all-gather -> matmul and
            matmul -> reduce-scatter in the compiled graphs into torch's symmetric-memory fused ops
            (`fused_all_gather_matmul`, `fused_matmul_reduce_scatter`), torchtitan's route.
  eager     (any backend, gloo included: the CPU tests prove the math with it) the GEMM is split by
            rank along T. `gather_linear`: the all-gather runs asynchronously while this rank's own
            chunk is multiplied, then the peers' chunks; its backward reduces the input gradient
            chunk by chunk (one async reduce per destination rank, issued as soon as that chunk's GEMM
            is done) while the weight gradient's GEMM runs. `linear_scatter`: chunk j of the partial
            output is reduced to rank j as soon as it is computed, while chunk j+1 is multiplied; its
            backward is `gather_linear`'s forward pattern.

Autocast: the GEMMs run in the autocast dtype when autocast is on (as F.linear would), gradients
return in the parameters' dtype. Not here: which layer calls what (layers.py), the plain collectives
(comm.py).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.comm import SEQ_DIM, group_rank, group_size, use_symm_all_reduce

_c10d = torch.ops._c10d_functional

# torch >= 2.12 names it all_gather_single; older releases all_gather_into_tensor (same arguments)
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _symm_mem_group(group) -> bool:
    """Register `group` for torch's symmetric memory (NVLink peer buffers); False where it cannot be
    (no CUDA build with NCCL and symmetric memory, or `group` is not an NCCL group)."""
    if group is None or not dist.is_nccl_available() or dist.get_backend(group) != "nccl":
        return False
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group
    except ImportError:
        return False
    with warnings.catch_warnings():  # deprecated (a no-op need) in newer torch; torch 2.11 still needs it
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(group.group_name)
    return True


def enable_async_tp(group) -> bool:
    """Turn on inductor's micro-pipeline TP for `group`'s collectives in compiled graphs; True if it
    applies (a CUDA build with NCCL and symmetric memory, `group` an NCCL group), else False (the
    eager chunked path still overlaps)."""
    if not _symm_mem_group(group):
        return False
    import torch._inductor.config as inductor_config
    inductor_config._micro_pipeline_tp = True
    return True


def enable_symm_all_reduce(group) -> bool:
    """`parallel.tp_all_reduce='symm'`: the all-reduces of tensor parallelism on `group` that sit on the
    critical path (after a row-parallel layer; a replicated input's gradient) run torch's two-shot
    symmetric-memory all-reduce (comm.symm_all_reduce) instead of NCCL's, eager and compiled; the
    overlapped ones (copy_linear's backward) stay NCCL. True if it applies (as enable_async_tp).
    (Inductor's own lowering, `_collective.auto_select`, failed on torch 2.11: two graphs' buffers
    got one allocation id, docs/benchmarks.md.)"""
    if not _symm_mem_group(group):
        return False
    use_symm_all_reduce(group)
    return True


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _gather_mm(x: torch.Tensor, w: torch.Tensor, group) -> tuple:
    """(gather_T(x) @ w^T (B, T, o), the gathered parts (n, B, T / n, K)): the all-gather in flight
    while this rank's own chunk is multiplied."""
    n, r = group_size(group), group_rank(group)
    x = x.contiguous()
    flat = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)  # (n B, T / n, K)
    work = _all_gather_into(flat, x, group=group, async_op=True)
    mine = F.linear(x, w)  # (B, T / n, o): overlapped with the gather
    work.wait()
    parts = flat.view((n,) + tuple(x.shape))  # (n, B, T / n, K)
    return torch.cat([mine if j == r else F.linear(parts[j], w) for j in range(n)], dim=SEQ_DIM), parts


def _launch_mm_scatter(x: torch.Tensor, w: torch.Tensor, group):
    """Start reduce_scatter_T(x @ w^T): chunk j of the partial product is reduced to rank j as soon
    as it is computed, while the next chunk is multiplied. Returns `finish()` -> (B, T / n, o)."""
    n, r = group_size(group), group_rank(group)
    if x.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by the tensor-parallel degree {n}")
    chunks, works = [], []
    for j, xj in enumerate(x.chunk(n, dim=SEQ_DIM)):
        yj = F.linear(xj, w)  # (B, T / n, o): this rank's partial sum of rank j's tokens
        chunks.append(yj)
        works.append(dist.reduce(yj, dst=dist.get_global_rank(group, j), group=group, async_op=True))

    def finish() -> torch.Tensor:
        for work in works:
            work.wait()
        return chunks[r]  # reduced in place on its destination
    return finish


class _GatherLinear(torch.autograd.Function):
    """Column-parallel under SP: y = gather_T(x) @ W^T + b, x (B, T / n, K) -> y (B, T, o / n)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            y, parts = _gather_mm(x.to(dtype), w, group)
            if bias is not None:
                y = y + bias.to(dtype)
        ctx.save_for_backward(parts, w)
        ctx.group, ctx.has_bias, ctx.dtypes = group, bias is not None, (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        parts, w = ctx.saved_tensors
        dy = dy.to(w.dtype).contiguous()  # (B, T, o / n)
        finish = _launch_mm_scatter(dy, w.t(), ctx.group)  # dx partial sums on their way to their ranks
        x = torch.cat(parts.unbind(0), dim=SEQ_DIM)  # (B, T, K): the gathered input
        dw = dy.flatten(0, 1).t() @ x.flatten(0, 1)  # (o / n, K), while the reductions run
        db = dy.sum(dim=(0, 1)) if ctx.has_bias else None
        dx = finish()  # (B, T / n, K)
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None if db is None else db.to(ctx.dtypes[1]), None


class _LinearScatter(torch.autograd.Function):
    """Row-parallel under SP: y = reduce_scatter_T(x @ W^T), x (B, T, K / n) -> y (B, T / n, o)."""

    @staticmethod
    def forward(ctx, x, weight, group):
        dtype, ctx.dtypes = _compute_dtype(x), (x.dtype, weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            x, w = x.to(dtype), weight.to(dtype)
            y = _launch_mm_scatter(x, w, group)()
        ctx.save_for_backward(x, w)
        ctx.group = group
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, parts = _gather_mm(dy.to(w.dtype), w.t(), ctx.group)  # gather_T(dy) @ W: (B, T, K / n)
        dy_full = torch.cat(parts.unbind(0), dim=SEQ_DIM)  # (B, T, o)
        dw = dy_full.flatten(0, 1).t() @ x.flatten(0, 1)  # (o, K / n)
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None


class _CopyLinear(torch.autograd.Function):
    """Column-parallel on a replicated input: y = x W^T + b, x (..., K) -> y (..., o / n). Backward:
    dx = dy W is all-reduced while dW = dy^T x runs; the wait is the last thing before returning
    (functional collective ops, so a compiled graph keeps all_reduce -> mm(dW) -> wait)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        dtype, ctx.dtypes = _compute_dtype(x), (x.dtype, weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            x, w = x.to(dtype), weight.to(dtype)
            y = F.linear(x, w, None if bias is None else bias.to(dtype))  # (..., o / n)
        ctx.save_for_backward(x, w)
        ctx.group_name, ctx.has_bias = group.group_name, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.to(w.dtype)
        dx = _c10d.all_reduce(dy @ w, "sum", ctx.group_name)  # (..., K): partial sums, reduced in flight
        dw = dy.flatten(0, -2).t() @ x.flatten(0, -2)  # (o / n, K), while the all-reduce runs
        db = dy.flatten(0, -2).sum(0) if ctx.has_bias else None
        dx = _c10d.wait_tensor(dx)
        return dx.to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None if db is None else db.to(ctx.dtypes[1]), None


def copy_linear(x: torch.Tensor, weight: torch.Tensor, bias, group) -> torch.Tensor:
    """F.linear(copy_to_tp(x), weight, bias), the backward's all-reduce overlapped with dW's GEMM."""
    return _CopyLinear.apply(x, weight, bias, group)


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias, group) -> torch.Tensor:
    """F.linear(gather_seq(x), weight, bias), the gather overlapped with the GEMM (eager)."""
    return _GatherLinear.apply(x, weight, bias, group)


def linear_scatter(x: torch.Tensor, weight: torch.Tensor, group) -> torch.Tensor:
    """reduce_scatter_seq(F.linear(x, weight)), the reduction overlapped with the GEMM (eager)."""
    return _LinearScatter.apply(x, weight, group)
