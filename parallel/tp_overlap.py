"""Tensor parallelism's row-parallel reductions hidden behind compute by batch halves (`parallel.tp_overlap`;
Megatron's / DeepSpeed-Domino's TP overlap; issue 17).

Plain TP ends every attention and every MLP with an all-reduce (under sequence parallelism a reduce-scatter)
of the row-parallel layer's partial sums, and the next operation needs it: on 2 H200s the 115 all-reduces of
an h200_1b TP2 step ran at link speed and none was hidden (12-17 ms of a 68 ms graphed step; docs/benchmarks.md).
Here a block's attention and its MLP each run on the two halves of the batch (rows 0..B/2 and B/2..B) one
after the other; the row-parallel layer launches its reduction without waiting (`start_reduce`: a functional
collective, NCCL's stream on CUDA), and the halves are waited for only after both have been computed
(`wait_reduce`), so the first half's reduction runs while the second half's GEMMs and attention do. Rows
are independent in a block, so the result is the whole batch's, row by row (the GEMMs run on B/2 rows: bf16
rounding may differ from the whole batch's, fp32 not beyond GEMM blocking).

The wait is an explicit `wait_tensor` where the halves join, so a compiled region keeps launch -> the other
half's compute -> wait in its generated code, and a CUDA graph captures the two streams' order (the step
graph: megaflow/step_graph.py). The backward of a deferred reduction is the plain one's (identity; under SP
an all-gather along T); the column-parallel layers' backward all-reduces are parallel.async_tp's to overlap
(`copy_linear`: each with its weight gradient's GEMM).

What is split: the attention's context (RoPE tables (B, 1, T, hd) and a dense (B, 1, T, T) mask by rows; a
shared one-row mask and None as they are). A FlexAttention BlockMask (document masking on a GPU) or a KV cache
(generation) run the whole batch at once, as does a batch of one row or an odd number of rows: the same numbers
without the overlap. Not here: which layers defer (tensor_parallel.apply_tp), the plain collectives (comm.py).
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn as nn

from parallel.comm import SEQ_DIM, all_gather, group_size, seq_to_rows

_c10d = torch.ops._c10d_functional


class _StartReduce(torch.autograd.Function):
    """Launch the sum of the partial products `y` over the group, not waited: an all-reduce, or under
    sequence parallelism a reduce-scatter along T (in rows order, comm.seq_to_rows: one dim-0 collective)."""

    @staticmethod
    def forward(ctx, y, group, sequence_parallel: bool):
        ctx.group, ctx.sp = group, sequence_parallel
        if sequence_parallel:  # (B, T, D) -> (n B, T / n, D) -> this rank's (B, T / n, D), once waited
            n = group_size(group)
            return _c10d.reduce_scatter_tensor(seq_to_rows(y, n).contiguous(), "sum", n, group.group_name)
        return _c10d.all_reduce(y.contiguous(), "sum", group.group_name)

    @staticmethod
    def backward(ctx, g):
        return (all_gather(g, ctx.group, SEQ_DIM) if ctx.sp else g), None, None


class _WaitReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return _c10d.wait_tensor(y)

    @staticmethod
    def backward(ctx, g):
        return g


def start_reduce(y: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """reduce_from_tp (SP: reduce_scatter_seq) launched; its value is valid only after `wait_reduce`."""
    return _StartReduce.apply(y, group, sequence_parallel)


def wait_reduce(y: torch.Tensor) -> torch.Tensor:
    return _WaitReduce.apply(y)


def _half(t, i: int, rows: int):
    """Rows of half i of a per-row tensor; a tensor broadcast over rows (or anything else) as it is."""
    if torch.is_tensor(t) and t.dim() and t.shape[0] == rows:
        return t.narrow(0, i * rows // 2, rows // 2)
    return t


def split_context(ctx, rows: int):
    """The attention context of each half, or None where it cannot be split (see the file docstring)."""
    if ctx is None:
        return [None, None]
    mask = ctx.mask
    if ctx.cache is not None or not (mask is None or torch.is_tensor(mask)):
        return None
    return [dataclasses.replace(ctx, cos=_half(ctx.cos, i, rows), sin=_half(ctx.sin, i, rows),
                                mask=_half(mask, i, rows)) for i in range(2)]


def _halves_forward(self: nn.Module, x: torch.Tensor, ctx=None) -> torch.Tensor:
    """The module's own forward on each half of the batch, both launched before either is waited for."""
    whole = type(self).forward
    call = (lambda m, h, c: whole(m, h)) if ctx is None else whole
    rows = x.shape[0]
    contexts = split_context(ctx, rows) if rows >= 2 and rows % 2 == 0 else None
    if contexts is None:
        return wait_reduce(call(self, x, ctx))
    halves = [call(self, xi, ci) for xi, ci in zip(x.chunk(2, 0), contexts)]  # each one's reduction in flight
    return torch.cat([wait_reduce(h) for h in halves], 0)  # (B, T, D); under SP (B, T / n, D)


def apply_batch_halves(module: nn.Module, row: nn.Module) -> None:
    """Run `module` (a block's attention or MLP, ending in the row-parallel layer `row`) on batch halves:
    `row` launches its reduction without waiting, `module`'s forward waits where the halves join. The
    forward is replaced on the instance (names, state dicts and checkpoints are unchanged)."""
    if row.bias is not None:  # a bias is added after the reduction; the blocks' row layers have none
        raise ValueError(f"parallel.tp_overlap: {type(row).__name__} has a bias; set parallel.tp_overlap=false")
    row.defer_reduce = True
    module.forward = types.MethodType(_halves_forward, module)
