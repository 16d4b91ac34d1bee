"""Tensor-parallel layers of the local backend (plain torch.distributed: gloo on CPU, NCCL on GPU).

Each layer takes its process group as an argument and is built from the dense layer it replaces
(`from_dense`): on the meta device it only takes the shape; on a materialised model it also copies
this rank's shard, so `apply_tp` works before and after initialisation. A layer names its sharded
parameters in `tp_shards` ({param name: dim}); parameters not named there are replicated. That map is
what checkpoint_tp.py reads to load and gather full state dicts; the Transformer Engine layers of
backend.py carry the same map, so both backends shard (and save) weights identically. A fused
projection (QKV, gate/up) also names its parts in `tp_parts` (parallel/fused.py): each part is split
on its own, so a rank holds its q heads and its k/v heads.

Not here: which layer goes where (tensor_parallel.py), the collectives themselves (comm.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.layers import RMSNorm
from parallel.async_tp import copy_linear, gather_linear, linear_scatter
from parallel.comm import (copy_to_tp, gather_hidden, gather_rows, gather_seq, group_rank, group_size, reduce_from_tp,
                           reduce_scatter_seq, rows_to_seq, scatter_rows, seq_to_rows, split_seq)
from parallel.fused import all_sharded, shard_parts
from parallel.tp_overlap import start_reduce


def shard(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of a full tensor along `dim`."""
    return t.chunk(group_size(group), dim=dim)[group_rank(group)]


def _param(shape, like: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype), requires_grad=requires_grad)


@torch.no_grad()
def copy_shards(new: nn.Module, old: nn.Module) -> nn.Module:
    """Fill `new`'s parameters from the dense module `old` (slicing the ones in `new.tp_shards`)
    and carry over requires_grad. On the meta device there is nothing to copy."""
    shards, parts = getattr(new, "tp_shards", {}), getattr(new, "tp_parts", {})
    for name, p in new.named_parameters(recurse=False):
        src = getattr(old, name, None)
        if src is None:  # e.g. an empty bias placeholder of a Transformer Engine layer
            continue
        if src.is_meta:
            pass
        elif name in parts:
            p.copy_(shard_parts(src, parts[name], group_size(new.tp_group), group_rank(new.tp_group)))
        else:
            p.copy_(shard(src, new.tp_group, shards[name]) if name in shards else src)
        p.requires_grad_(src.requires_grad)
    return new


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with the output features (rows of W, and b) split over the group: each rank
    returns its slice of the features. `input_comm`: 'none' when a ParallelRMSNorm in front already
    entered the parallel region, 'copy' for a replicated input (backward all-reduces its gradient),
    'copy_async' the same with that all-reduce overlapped with the weight gradient's GEMM (async TP
    without SP), 'gather' for a T-sharded input under sequence parallelism with async TP
    (parallel/async_tp.py: eager, the all-gather overlapped with the GEMM; compiled, the gather in
    rows order that inductor fuses with the GEMM). `parts` (rows of each part, for a fused
    projection): each part is split on its own."""
    tp_shards = {"weight": 0, "bias": 0}
    linear = staticmethod(F.linear)  # the GEMM; FP8 replaces it per layer (megaflow/fp8.py apply_fp8)

    def __init__(self, in_features: int, out_features: int, bias: bool, group, input_comm: str = "none",
                 like: Optional[torch.Tensor] = None, parts: Optional[tuple] = None):
        super().__init__()
        n = group_size(group)
        assert input_comm in ("none", "copy", "copy_async", "gather") and out_features % n == 0
        like = like if like is not None else torch.empty(0)
        self.tp_group, self.input_comm = group, input_comm
        if parts is not None:
            assert sum(parts) == out_features and all(r % n == 0 for r in parts), (parts, n)
            self.tp_parts = {"weight": all_sharded(parts), "bias": all_sharded(parts)}
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features // n, in_features), like)
        self.bias = _param((out_features // n,), like) if bias else None

    @classmethod
    def from_dense(cls, lin: nn.Linear, group, input_comm: str = "none", parts: Optional[tuple] = None):
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, group, input_comm, lin.weight, parts)
        return copy_shards(new, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, n = self.tp_group, group_size(self.tp_group)
        if self.input_comm == "copy" or (self.input_comm == "copy_async" and n == 1):
            x = copy_to_tp(x, g)
        elif self.input_comm == "copy_async":
            return copy_linear(x, self.weight, self.bias, g)  # (..., out / tp)
        elif self.input_comm == "gather" and n > 1:  # (B, T / tp, in) -> (B, T, out / tp)
            if not torch.compiler.is_compiling():
                return gather_linear(x, self.weight, self.bias, g)
            if torch.is_autocast_enabled(x.device.type):  # gather what the GEMM reads (fp32 weights: half the
                x = x.to(torch.get_autocast_dtype(x.device.type))  # bytes; no cast between gather and matmul)
            y = F.linear(gather_rows(x, g), self.weight, self.bias)  # (tp B, T / tp, out / tp): rows order
            return rows_to_seq(y, n)
        return self.linear(x, self.weight, self.bias)  # (..., out_features / tp)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}/{group_size(self.tp_group)}, input_comm={self.input_comm}"


class RowParallelLinear(nn.Module):
    """y = x W^T + b with the input features (columns of W) split over the group; partial outputs
    are all-reduced, or reduce-scattered along the sequence under sequence parallelism. The bias is
    replicated and added after the reduction. `async_tp` (with SP): the reduce-scatter overlapped
    with the GEMM (parallel/async_tp.py; compiled: inductor's fusion)."""
    tp_shards = {"weight": 1}
    linear = staticmethod(F.linear)  # the GEMM; FP8 replaces it per layer (megaflow/fp8.py apply_fp8)
    defer_reduce = False  # parallel.tp_overlap: the reduction launched, not waited (its caller waits; tp_overlap.py)

    def __init__(self, in_features: int, out_features: int, bias: bool, group, sequence_parallel: bool = False,
                 like: Optional[torch.Tensor] = None, async_tp: bool = False):
        super().__init__()
        n = group_size(group)
        assert in_features % n == 0
        like = like if like is not None else torch.empty(0)
        self.tp_group, self.sequence_parallel = group, sequence_parallel
        self.async_tp = async_tp and sequence_parallel and n > 1
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features // n), like)
        self.bias = _param((out_features,), like) if bias else None

    @classmethod
    def from_dense(cls, lin: nn.Linear, group, sequence_parallel: bool = False, async_tp: bool = False):
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, group, sequence_parallel, lin.weight,
                  async_tp)
        return copy_shards(new, lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, sp = self.tp_group, self.sequence_parallel
        if self.defer_reduce and group_size(g) > 1:  # the caller waits (tp_overlap.apply_batch_chunks: no bias)
            return start_reduce(self.linear(x, self.weight), g, sp)  # (B, T, out); SP (B, T / tp, out), in flight
        if self.async_tp and sp and not torch.compiler.is_compiling():  # sp: off while sampling (sampling.py)
            y = linear_scatter(x, self.weight, g)  # (B, T / tp, out): the reduction overlapped with the GEMM
        elif self.async_tp and sp:  # compiled: GEMM -> reduce-scatter in rows order, which inductor fuses
            y = scatter_rows(F.linear(seq_to_rows(x, group_size(g)), self.weight), g)  # (B, T / tp, out)
        else:
            y = self.linear(x, self.weight)  # partial sums over the input slices
            y = reduce_scatter_seq(y, g) if sp else reduce_from_tp(y, g)
        if self.bias is not None:
            y = y + (copy_to_tp(self.bias, g) if sp else self.bias)  # SP: each rank sees only its tokens
        return y

    def extra_repr(self):
        return (f"{self.in_features}/{group_size(self.tp_group)}, {self.out_features}, "
                f"sequence_parallel={self.sequence_parallel}, "
                f"async_tp={self.async_tp}")


class SequenceParallelLinear(nn.Linear):
    """A replicated linear on T-sharded tokens, the Pretzel skips' layer under sequence parallelism:
    each rank multiplies its own tokens by the whole weight, so the forward moves no activation (a
    row-parallel skip took an all-to-all of its input and a reduce-scatter of its output, and their
    pair in backward); the weight's gradient, a partial sum over this rank's tokens, is all-reduced
    through copy_to_tp, as ParallelRMSNorm's. Same numbers as the dense layer on the gathered tokens.
    (Without SP a skip stays a plain replicated nn.Linear: both streams are whole on every rank, so
    each rank computes the same product and the same weight gradient with no collective at all.)"""

    @classmethod
    def from_dense(cls, lin: nn.Linear, group):
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, lin.bias is not None)
        new.tp_group, new.weight, new.bias = group, lin.weight, lin.bias  # the same Parameters: nothing to shard
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T / tp, in) -> (B, T / tp, out)
        g = self.tp_group
        return F.linear(x, copy_to_tp(self.weight, g), None if self.bias is None else copy_to_tp(self.bias, g))

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, replicated on T-sharded tokens"


class ReplicatedKVLinear(nn.Module):
    """The fused QKV projection when there are fewer key/value heads than ranks: the q rows are
    column-parallel (this rank's heads), the k and v rows whole on every rank (they are small); a rank
    computes the one k/v head its query heads read. The k/v rows pass through copy_to_tp, so their
    gradient is summed over the ranks and stays replicated. Output: [q_r; k_head; v_head]."""
    tp_shards = {"weight": 0, "bias": 0}

    def __init__(self, lin: nn.Linear, group, sizes: tuple, head_dim: int, kv_index: int, input_comm: str = "none"):
        super().__init__()
        assert input_comm in ("none", "copy", "gather")
        n = group_size(group)
        q, k, v = sizes
        parts = ((q, True), (k, False), (v, False))
        self.tp_group, self.input_comm, self.tp_parts = group, input_comm, {"weight": parts, "bias": parts}
        self.q_rows = q // n
        start = kv_index * head_dim  # the head's rows in k, and in v (which follows k)
        self.k_head, self.v_head = slice(start, start + head_dim), slice(k + start, k + start + head_dim)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        like = lin.weight
        self.weight = _param((self.q_rows + k + v, lin.in_features), like)
        self.bias = _param((self.q_rows + k + v,), like) if lin.bias is not None else None
        copy_shards(self, lin)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        kv = copy_to_tp(t[self.q_rows:], self.tp_group)  # (k + v rows, ...): whole, gradient summed
        return torch.cat([t[:self.q_rows], kv[self.k_head], kv[self.v_head]])  # (q_r + 2 hd, ...)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_comm == "copy":
            x = copy_to_tp(x, self.tp_group)
        elif self.input_comm == "gather":
            x = gather_seq(x, self.tp_group)
        return F.linear(x, self._rows(self.weight), None if self.bias is None else self._rows(self.bias))

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features} (q/{group_size(self.tp_group)}, k/v replicated), "
                f"k rows {self.k_head.start}:{self.k_head.stop}")


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the group; a rank looks up the tokens in its range, zeros the
    others, and the all-reduce assembles the full embedding."""
    tp_shards = {"weight": 0}

    def __init__(self, num_embeddings: int, embedding_dim: int, group, like: Optional[torch.Tensor] = None):
        super().__init__()
        n = group_size(group)
        assert num_embeddings % n == 0
        like = like if like is not None else torch.empty(0)
        self.tp_group, self.num_embeddings, self.embedding_dim = group, num_embeddings, embedding_dim
        self.vocab_start = group_rank(group) * (num_embeddings // n)
        self.weight = _param((num_embeddings // n, embedding_dim), like)

    @classmethod
    def from_dense(cls, emb: nn.Embedding, group):
        return copy_shards(cls(emb.num_embeddings, emb.embedding_dim, group, emb.weight), emb)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.tp_group)

    def extra_repr(self):
        return f"{self.num_embeddings}/{group_size(self.tp_group)}, {self.embedding_dim}"


class VocabParallelTextLoss(nn.Module):
    """Summed cross-entropy over targets != -100 from vocab-sharded logits (B, T, V / tp), without
    ever gathering the full vocabulary: a max, a sum of exponentials and the target logit are
    reduced over the group (Megatron's vocab-parallel cross-entropy). Same value as TextLoss."""

    def __init__(self, group):
        super().__init__()
        self.tp_group = group

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = self.tp_group
        logits = logits.flatten(0, 1).float()  # (N, V / tp)
        targets = targets.flatten()  # (N,)
        Vl = logits.shape[-1]
        with torch.no_grad():
            m = logits.max(dim=-1).values
            if group_size(g) > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=g)
        shifted = logits - m[:, None]
        sum_exp = reduce_from_tp(shifted.exp().sum(dim=-1), g)  # (N,)
        local = targets - group_rank(g) * Vl
        mine = (local >= 0) & (local < Vl)
        target_logit = shifted.gather(1, local.clamp(0, Vl - 1)[:, None]).squeeze(1) * mine  # (N,)
        target_logit = reduce_from_tp(target_logit, g)
        loss = sum_exp.log() - target_logit
        return torch.where(targets != -100, loss, torch.zeros_like(loss)).sum()


class ParallelRMSNorm(RMSNorm):
    """RMSNorm at the entry of a tensor-parallel region, with the collective that enters it:
    'copy' (replicated input, backward all-reduce), 'gather' (SP: all-gather along T for
    tensor-parallel consumers), 'gather_replicated' (SP: all-gather for replicated consumers, e.g.
    the Gaussian head), or None (the consumer's own layer communicates, as Transformer Engine's do).
    Under sequence parallelism each rank normalises only its tokens, so the weight's gradient is
    partial: the weight passes through copy_to_tp, which all-reduces it."""

    def __init__(self, dim: int, eps: float, group, entry: Optional[str], sequence_parallel: bool):
        super().__init__(dim, eps)
        assert entry in (None, "copy", "gather", "gather_replicated")
        self.tp_group, self.entry, self.sequence_parallel = group, entry, sequence_parallel

    @classmethod
    def from_dense(cls, norm: RMSNorm, group, entry: Optional[str], sequence_parallel: bool):
        with torch.device("meta"):
            new = cls(norm.weight.shape[0], norm.eps, group, entry, sequence_parallel)
        new.weight = norm.weight  # the same Parameter: nothing to shard
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp(self.weight, self.tp_group) if self.sequence_parallel else self.weight
        y = F.rms_norm(x.float(), (x.shape[-1],), w.float(), self.eps).to(x.dtype)  # as RMSNorm.forward
        if self.entry == "copy":
            return copy_to_tp(y, self.tp_group)
        if self.entry in ("gather", "gather_replicated"):
            return gather_seq(y, self.tp_group, reduce_grad=self.entry == "gather")  # (B, T, D)
        return y

    def extra_repr(self):
        return f"{self.weight.shape[0]}, entry={self.entry}, sequence_parallel={self.sequence_parallel}"


class SequenceSplit(nn.Module):
    """The model's `seq_split` hook under sequence parallelism: keep this rank's slice of T."""

    def __init__(self, group):
        super().__init__()
        self.tp_group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_seq(x, self.tp_group)


class VocabGather(nn.Module):
    """The model's `vocab_gather` hook: full-vocabulary logits for sampling (generation only; the
    training loss reads the sharded logits)."""

    def __init__(self, group):
        super().__init__()
        self.tp_group = group

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_hidden(logits, self.tp_group, dim=-1)
