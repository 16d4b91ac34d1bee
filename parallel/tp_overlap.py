"""Tensor parallelism's row-parallel reductions hidden behind compute by row chunks of the batch (`parallel.tp_overlap`;
Megatron's / DeepSpeed-Domino's TP overlap; issue 17).

Plain TP ends every attention and every MLP with an all-reduce (under sequence parallelism a reduce-scatter)
of the row-parallel layer's partial sums, and the next operation needs it: on 2 H200s the 115 all-reduces of
an h200_1b TP2 step ran at link speed and none was hidden (12-17 ms of a 68 ms graphed step; docs/benchmarks.md).
Here a block's attention and its MLP each run on k row chunks of the batch (`parallel.tp_overlap: k`; 2:
the halves, rows 0..B/2 and B/2..B) one after the other; the row-parallel layer launches its reduction
without waiting (`start_reduce`: a functional collective, NCCL's stream on CUDA), and the chunks are waited
for only after all have been computed (`wait_reduce`), so each chunk's reduction runs while the next
chunks' GEMMs and attention do (the last one's stays exposed: 1 in k). Rows are independent in a block, so
the result is the whole batch's, row by row (the GEMMs run on B/k rows: bf16 rounding may differ from the
whole batch's, fp32 not beyond GEMM blocking).

The wait is an explicit `wait_tensor` where the chunks join, so a compiled region keeps launch -> the next
chunks' compute -> wait in its generated code, and a CUDA graph captures the two streams' order (the step
graph: megaflow/step_graph.py). The backward of a deferred reduction is the plain one's (identity; under SP
an all-gather along T). Without SP the chunks enter the TP region themselves (`enter_chunks`), so the
backward's input-gradient all-reduces overlap the same way: chunk j's flies while the chunks before it run
their backward; compiled, `raise_collectives` keeps that order. (Under SP the norm in front gathers and its
backward reduce-scatters the whole batch: not overlapped.)

What is split: the attention's context (RoPE tables (B, 1, T, hd) and a dense (B, 1, T, T) mask by rows; a
FlexAttention BlockMask, document masking on a GPU, by its block tables' rows with its rule shifted to them; a
shared one-row mask and None as they are). A KV cache (generation) runs the whole batch at once, as does a
batch whose rows k does not divide: the same numbers without the overlap. (Until the BlockMask was split, the
attention of h200_1b's batches on the H200s ran whole and only the MLPs in chunks: slower, docs/benchmarks.md.) Not here: which layers defer (tensor_parallel.apply_tp), the plain collectives (comm.py).
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn as nn

from megaflow.model.masks import BlockMask, block_mask_rows  # BlockMask: None on a torch without FlexAttention
from parallel.comm import SEQ_DIM, all_gather, copy_to_tp, group_size, seq_to_rows

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


class _EnterStart(torch.autograd.Function):
    """copy_to_tp of one chunk's input whose backward launches the all-reduce of the chunk's input gradient
    and does not wait (the chunk's `_EnterWait` does, after the earlier chunks' backward)."""

    @staticmethod
    def forward(ctx, x, group_name: str):
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _c10d.all_reduce(g.contiguous(), "sum", ctx.group_name), None


class _EnterWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _c10d.wait_tensor(g)


def enter_chunks(chunks: list, group) -> list:
    """copy_to_tp of each row chunk of a replicated input, the backward's all-reduces overlapped across chunks:
    chunk j's input-gradient all-reduce runs while chunks j-1.. compute their backward. Autograd runs the ready
    node made last first, so the waits, made here before any chunk's compute, run after every chunk's
    backward. (A compiled backward is ordered by AOTAutograd's own walk instead: `raise_collectives`.)"""
    waited = [_EnterWait.apply(c) for c in chunks]
    return [_EnterStart.apply(c, group.group_name) for c in waited]


def start_reduce(y: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """reduce_from_tp (SP: reduce_scatter_seq) launched; its value is valid only after `wait_reduce`."""
    return _StartReduce.apply(y, group, sequence_parallel)


def wait_reduce(y: torch.Tensor) -> torch.Tensor:
    return _WaitReduce.apply(y)


def _chunk(t, i: int, k: int, rows: int):
    """Rows of chunk i of k of a per-row tensor; a tensor broadcast over rows (or anything else) as it is."""
    if torch.is_tensor(t) and t.dim() and t.shape[0] == rows:
        return t.narrow(0, i * rows // k, rows // k)
    return t


def _shifted(rule, first: int):
    """A mask rule over a chunk's rows: the batch's rule at row b + first (the document rule indexes doc_ids[b])."""
    return lambda b, h, q, k: rule(b + first, h, q, k)


def _chunk_block_mask(mask, i: int, k: int, rows: int):
    """Chunk i of k of a FlexAttention BlockMask over `rows` rows: its block tables' rows (views) and its rule
    shifted to them; a mask of one broadcast row as it is."""
    if mask.kv_num_blocks.shape[0] == 1:
        return mask
    first = i * rows // k
    return block_mask_rows(mask, first, first + rows // k, _shifted(mask.mask_mod, first))


def split_context(ctx, rows: int, k: int):
    """The attention context of each of k row chunks, or None where it cannot be split (see the file docstring)."""
    if ctx is None:
        return [None] * k
    mask = ctx.mask
    block = BlockMask is not None and isinstance(mask, BlockMask) and mask.kv_num_blocks.shape[0] in (1, rows)
    if ctx.cache is not None or not (mask is None or torch.is_tensor(mask) or block):
        return None
    return [dataclasses.replace(ctx, cos=_chunk(ctx.cos, i, k, rows), sin=_chunk(ctx.sin, i, k, rows),
                                mask=_chunk_block_mask(mask, i, k, rows) if block else _chunk(mask, i, k, rows))
            for i in range(k)]


def _chunks_forward(self: nn.Module, x: torch.Tensor, ctx=None) -> torch.Tensor:
    """The module's own forward on each row chunk, all launched before any is waited for."""
    whole, k = type(self).forward, self.tp_overlap_chunks
    call = (lambda m, h, c: whole(m, h)) if ctx is None else whole
    rows = x.shape[0]
    contexts = split_context(ctx, rows, k) if rows >= k and rows % k == 0 else None
    if contexts is None:
        if self.tp_enter_group is not None:
            x = copy_to_tp(x, self.tp_enter_group)
        return wait_reduce(call(self, x, ctx))
    xs = x.chunk(k, 0)
    if self.tp_enter_group is not None:  # the chunks enter the TP region themselves (no SP): deferred backward
        xs = enter_chunks(xs, self.tp_enter_group)
    chunks = [call(self, xi, ci) for xi, ci in zip(xs, contexts)]  # each one's reduction in flight
    return torch.cat([wait_reduce(h) for h in chunks], 0)  # (B, T, D); under SP (B, T / n, D)


PASSES = ("sink_waits", "raise_comms")


def raise_collectives() -> None:
    """Compiled graphs launch each collective as soon as its input is ready and wait for it only where its
    result is first used (inductor's `raise_comms` and `sink_waits` passes; set for the process, as
    async_tp.enable_async_tp sets its pass; apply_tp sets them under parallel.tp_comm_reorder:
    'auto' with tp_overlap, 'on' for every TP run). AOTAutograd orders a backward graph by its own walk, not by autograd's:
    read on CPU (torch 2.13), a chunked MLP's backward computed every chunk's GEMMs and then launched both
    input-gradient all-reduces and waited; raised, chunk j's all-reduce launches before chunk j-1's GEMMs
    (tests/parallel/test_overlap.py). Without chunks the same passes put the attention's weight-gradient GEMMs
    beside its input-gradient all-reduce (what parallel.async_tp's copy_linear does by hand), and under SP
    with chunks each forward reduce-scatter beside the other chunk's compute (waited at once without them).
    Only collectives and their waits move."""
    import torch._inductor.config as inductor_config
    inductor_config.reorder_for_compute_comm_overlap = True
    passes = list(inductor_config.reorder_for_compute_comm_overlap_passes)
    inductor_config.reorder_for_compute_comm_overlap_passes = passes + [p for p in PASSES if p not in passes]


def apply_batch_chunks(module: nn.Module, row: nn.Module, k: int, entry: nn.Module = None,
                       column: nn.Module = None) -> None:
    """Run `module` (a block's attention or MLP, ending in the row-parallel layer `row`) on k row chunks of
    the batch (k = 2: halves): `row` launches its reduction without waiting, `module`'s forward waits where
    the chunks join. Without sequence parallelism the chunks also enter the TP region themselves
    (`enter_chunks`: the copy that the norm in front, `entry`, or the first column-parallel layer, `column`,
    made for the whole batch), so the backward's input-gradient all-reduces overlap too. The forward is
    replaced on the instance (names, state dicts and checkpoints unchanged)."""
    if row.bias is not None:  # a bias is added after the reduction; the blocks' row layers have none
        raise ValueError(f"parallel.tp_overlap: {type(row).__name__} has a bias; set parallel.tp_overlap=0")
    row.defer_reduce = True
    module.tp_overlap_chunks, module.tp_enter_group = k, None
    if not row.sequence_parallel and entry is not None:
        entry.entry = None  # the norm's output stays as it is: the chunks copy it into the region
        column.input_comm = "none"  # not 'copy' / 'copy_async': that wait would come before the other chunks
        module.tp_enter_group = row.tp_group
    module.forward = types.MethodType(_chunks_forward, module)
