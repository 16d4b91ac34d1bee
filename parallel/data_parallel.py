"""Data-parallel gradient all-reduce in flat buckets, for the path without ZeRO.

After backward (all micro-batches of a step), `GradBuckets.all_reduce()` packs the gradients into a
few large flat buffers (grouped by dtype and device, filled in reverse parameter order as DDP does,
so a future overlap with backward sends the last layers first), all-reduces every bucket over the
data-parallel group asynchronously, and copies the results back.

Reduction is a SUM by default: the loss is normalised by GLOBAL counts (parallel/pipeline_step.py),
so each rank's gradient is already its share of the global-batch gradient and the shares add up.
`average=True` is for losses normalised per rank (then the mean over ranks is the right gradient
only when every rank holds the same number of tokens).

A gradient that is None on every rank stays None (an unused parameter is skipped by the optimizer,
as in one process); each bucket carries one extra slot per parameter to tell which ranks had one.
`allreduce_gradients(params, group)` is the stateless one-call form (averages by default).
Not here: overlap with backward, ZeRO (parallel/zero.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class GradBuckets:
    def __init__(self, params, dp_group, bucket_mb: float = 25.0, average: bool = False):
        self.group, self.average = dp_group, average
        self.world = dist.get_world_size(dp_group) if dp_group is not None else 1
        params = [p for p in params if p.requires_grad]
        limit = int(bucket_mb * 2 ** 20)
        self.buckets = []  # (params, flat buffer with numel + len(params) slots)
        cur, size = [], 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if cur and (p.dtype != cur[0].dtype or p.device != cur[0].device or size + nbytes > limit):
                self._add(cur)
                cur, size = [], 0
            cur.append(p)
            size += nbytes
        if cur:
            self._add(cur)

    def _add(self, params: list) -> None:
        n = sum(p.numel() for p in params) + len(params)
        self.buckets.append((params, torch.zeros(n, dtype=params[0].dtype, device=params[0].device)))

    @torch.no_grad()
    def all_reduce(self) -> None:
        if self.world == 1:
            return
        works = []
        for params, flat in self.buckets:
            off = 0
            for p in params:
                n = p.numel()
                if p.grad is None:
                    flat[off:off + n].zero_()
                else:
                    flat[off:off + n].copy_(p.grad.reshape(-1))
                off += n
            flags = flat[off:]  # 1 where this rank has a gradient
            flags.copy_(torch.tensor([float(p.grad is not None) for p in params], dtype=flat.dtype))
            works.append(dist.all_reduce(flat, group=self.group, async_op=True))
        for (params, flat), work in zip(self.buckets, works):
            work.wait()
            if self.average:
                flat.div_(self.world)
            off, flags = 0, flat[-len(params):].tolist()
            for p, flag in zip(params, flags):
                n = p.numel()
                if flag > 0:
                    if p.grad is None:
                        p.grad = torch.empty_like(p)
                    p.grad.copy_(flat[off:off + n].view_as(p))
                off += n

    def __repr__(self):
        sizes = [f"{flat.numel() * flat.element_size() / 2 ** 20:.1f}MiB" for _, flat in self.buckets]
        return f"GradBuckets({len(self.buckets)} buckets: {', '.join(sizes)}, dp={self.world})"


def allreduce_gradients(params, dp_group, average: bool = True, bucket_mb: float = 25.0) -> None:
    """One call, no state kept: bucket and all-reduce `params`' gradients over `dp_group`. The
    default `average=True` fits a loss normalised by each rank's OWN counts (megaflow.train's plain
    engine); with global-count normalisation pass average=False. Allocates the buckets on every call:
    a loop that runs many steps should keep a `GradBuckets`."""
    GradBuckets(params, dp_group, bucket_mb, average).all_reduce()
