"""Autograd-aware collectives of tensor and sequence parallelism (Megatron's f/g operators).

Every function takes its process group as an argument (never a global one) and is the identity when
the group is None or has one rank. Each forward collective is paired with the backward collective
that keeps gradients exact:

    copy_to_tp          fwd: identity              bwd: all-reduce       (enter a column-parallel region)
    reduce_from_tp      fwd: all-reduce            bwd: identity         (leave a row-parallel region)
    gather_hidden       fwd: all-gather dim        bwd: keep my slice    (replicate a sharded output)
    split_seq           fwd: keep my slice of T    bwd: all-gather T     (enter sequence parallelism)
    gather_seq          fwd: all-gather T          bwd: reduce-scatter T (sharded consumers) or keep my slice (replicated consumers)
    reduce_scatter_seq  fwd: reduce-scatter T      bwd: all-gather T     (leave a row-parallel region into SP)
    gather_rows         fwd: all-gather dim 0      bwd: reduce-scatter dim 0 (async TP, compiled: see below)
    scatter_rows        fwd: reduce-scatter dim 0  bwd: all-gather dim 0

`all_reduce` (copy_to_tp's backward, reduce_from_tp's forward) runs NCCL's functional all-reduce, or,
for a group given to `use_symm_all_reduce` (parallel.tp_all_reduce='symm'), `symm_all_reduce`: torch's
symmetric-memory two-shot all-reduce behind one custom op.

Async TP under torch.compile (parallel/async_tp.py) keeps the gathered tokens in "rows" order: the
all-gather of (B, T / n, D) along dim 0 gives (n B, T / n, D), rank r's tokens in rows r B..(r+1) B,
and the GEMM reads that directly (a GEMM does not care about the order of its rows); `rows_to_seq`
re-lays only its output. So the graph holds exactly all_gather -> wait -> matmul and, through
`seq_to_rows`, matmul -> reduce_scatter, the dim-0 patterns that inductor's micro-pipeline TP pass
fuses in every torch release that has it (no cat / split between the collective and the GEMM).

The sequence dimension is dim 1 of (B, T, ...) tensors. Not here: which layer uses which operator
(parallel/layers.py) and which group a layer gets (parallel/tensor_parallel.py).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

log = logging.getLogger("megaflow")

SEQ_DIM = 1

# torch >= 2.12 names them *_single; older releases *_tensor (same arguments).
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _done(t: torch.Tensor) -> torch.Tensor:
    """Functional collectives return, in eager mode, a tensor that waits when first used; wait here
    (on NCCL the stream waits, the host does not). Under torch.compile they are graph nodes."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        what = "sequence length" if dim == SEQ_DIM else f"dim {dim}"
        raise ValueError(f"{what} {x.shape[dim]} is not divisible by the tensor-parallel degree {n}; "
                         f"pad it to a multiple of {n} (or turn parallel.sequence_parallel off)")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# Functional (out-of-place) collectives: the form torch.compile traces as graph nodes (and, out of
# place, no clone of the input is needed). With the in-place torch.distributed calls, train.compile=on
# at tp=2 trained on a wrong loss on 2 H200s (7.28 where eager gave 3.67; docs/benchmarks.md, issue 17);
# on CPU (gloo) both forms compile to the eager numbers.
def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The ranks' `x` laid side by side along `dim`. Gathered along dim 0 and re-laid here: for any
    other dim, torch 2.11's functional all-gather calls `torch._utils._maybe_view_chunk_cat`, which
    dynamo refuses to trace, so every sequence-parallel gather inside a compiled block was a graph
    break (compiled TP2+SP ran 2x slower than TP2 on 2 H200s; docs/benchmarks.md, issue 17)."""
    dim = dim % x.dim()
    y = _done(_all_gather(x.contiguous(), 0, group))  # (n * x.shape[0], ...): rank r's x at rows r*B..
    return y if dim == 0 else torch.cat(y.chunk(group_size(group), 0), dim)


_SYMM_GROUPS: set = set()  # names of the groups whose all-reduces go through symmetric memory (use_symm_all_reduce)
_symm_buffers: dict = {}  # (group name, shape, dtype, device) -> this rank's persistent symmetric buffer
_symm_failed: set = set()  # the keys of _symm_buffers where symmetric memory failed: NCCL from then on


def _symm_try(key: tuple, attempt):
    """attempt() (a symmetric-memory all-reduce) unless it failed before for `key`; a failure is warned
    once, with its reason, and remembered, so later calls of that shape go to NCCL at once instead of
    failing again (a rendezvous or a kernel refused each time). None where it did not run."""
    if key in _symm_failed:
        return None
    try:
        return attempt()
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        _symm_failed.add(key)
        log.warning("parallel.tp_all_reduce=symm: symmetric memory failed for group %s, shape %s, %s (%s: %s); "
                    "this shape's all-reduces use NCCL from now on", key[0], list(key[1]), key[2],
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


def use_symm_all_reduce(group, on: bool = True) -> None:
    """Route `all_reduce` on `group` (CUDA tensors) through torch's symmetric memory from now on (or
    not, `on=False`): the caller has checked that the group can (async_tp.enable_symm_all_reduce)."""
    (_SYMM_GROUPS.add if on else _SYMM_GROUPS.discard)(group.group_name)


@torch.library.custom_op("megaflow::symm_all_reduce", mutates_args=())
def symm_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `x` over the group through torch's symmetric memory: copied into this shape's
    persistent symmetric buffer (made, and exchanged with the peers, at its first use: every rank
    reaches it in the same order), all-reduced there by the two-shot kernel (NVLink peer reads, no
    NCCL; on 2 H200s 0.15 ms for 32 MiB against NCCL's 0.48, docs/benchmarks.md), copied out. An
    opaque op to torch.compile. Where symmetric memory fails (no CUDA, an unsupported size): NCCL /
    gloo on a copy, the same sum (a failure warned once and remembered per shape: `_symm_try`)."""
    key = (group_name, tuple(x.shape), x.dtype, x.device)

    def symm():
        buf = _symm_buffers.get(key)
        if buf is None:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group_name)
            _symm_buffers[key] = buf
        buf.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group_name)
        return buf.clone()  # the buffer is reused by the next call of this shape

    out = _symm_try(key, symm) if x.is_cuda else None
    if out is not None:
        return out
    from torch.distributed.distributed_c10d import _resolve_process_group
    out = x.clone()
    dist.all_reduce(out, group=_resolve_process_group(group_name))
    return out


@symm_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _SYMM_GROUPS and group.group_name in _SYMM_GROUPS and x.is_cuda:
        return torch.ops.megaflow.symm_all_reduce(x.contiguous(), group.group_name)
    return _done(funcol.all_reduce(x.contiguous(), "sum", group))


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by the tensor-parallel degree {n}")
    return _done(_reduce_scatter(x.contiguous(), "sum", dim % x.dim(), group))


def rows_to_seq(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n B, T / n, ...) in rows order -> (B, T, ...): rank r's token slice back at T slice r."""
    return x.unflatten(0, (n, -1)).transpose(0, 1).flatten(1, 2)  # (B, n, T / n, ...) -> (B, T, ...)


def seq_to_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, ...) -> (n B, T / n, ...): T slice r of every row in rows r B..(r+1) B."""
    if x.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence length {x.shape[SEQ_DIM]} is not divisible by the tensor-parallel degree {n}")
    return x.unflatten(1, (n, -1)).transpose(0, 1).flatten(0, 1)  # (n, B, T / n, ...) -> (n B, T / n, ...)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None  # out of place: g is left alone


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grad:  # every rank holds a partial gradient of the full tensor
            return reduce_scatter(g, ctx.group, ctx.dim), None, None, None
        return _split(g, ctx.group, ctx.dim), None, None, None  # every rank holds the full gradient


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


def _active(group) -> bool:
    return group_size(group) > 1


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group) if _active(group) else x


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group) if _active(group) else x


def gather_hidden(x, group, dim: int = -1):
    return _Gather.apply(x, group, dim % x.dim(), False) if _active(group) else x


def split_seq(x, group):
    return _Split.apply(x, group, SEQ_DIM) if _active(group) else x


def gather_seq(x, group, reduce_grad: bool = True):
    """All-gather along T. `reduce_grad`: the consumers are tensor-parallel (each rank's gradient is a
    partial sum, so the backward reduce-scatters); False when the consumers are replicated (each
    rank already holds the full gradient, so the backward just keeps its slice)."""
    return _Gather.apply(x, group, SEQ_DIM, reduce_grad) if _active(group) else x


def reduce_scatter_seq(x, group):
    return _ReduceScatter.apply(x, group, SEQ_DIM) if _active(group) else x


def gather_rows(x, group):
    """(B, T / n, ...) -> (n B, T / n, ...) by one all-gather along dim 0 (rows order, see above); the
    backward reduce-scatters dim 0 (the consumers are tensor-parallel)."""
    return _Gather.apply(x, group, 0, True) if _active(group) else x


def scatter_rows(x, group):
    """(n B, T / n, ...) partial sums in rows order -> this rank's (B, T / n, ...), summed over the group."""
    return _ReduceScatter.apply(x, group, 0) if _active(group) else x
