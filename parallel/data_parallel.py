"""Data-parallel gradient reduction in flat buckets, for the path without ZeRO, optionally overlapped
with the backward pass.

Buckets are filled in reverse parameter order (as DDP does: the last layers' gradients are ready
first in backward). A bucket is either

  in place  its gradients are adjacent views of one flat buffer (the fp32 main gradients of
            megaflow/optim.py MainWeights, laid out in model order): the bucket IS that slice, and
            the all-reduce runs on it, nothing copied; or
  copied    a buffer of its own plus one flag slot per parameter that tells which ranks had a
            gradient (a gradient None on every rank stays None: an unused parameter is skipped by
            the optimizer, as in one process); gradients are copied in and the sums copied back.

Overlap (`attach` + `arm` + `finish`): a post-accumulate-grad hook on every parameter autograd
accumulates into counts, during the LAST backward pass of the step over a chunk (`arm(chunk)`; the
earlier micro-batches only accumulate), which gradients are final; a bucket whose gradients are all
final is all-reduced asynchronously at once, while backward goes on. Buckets are launched strictly
in order (bucket i only after buckets 0..i-1), so every rank issues the same collectives in the same
order even when a rank's parameter gets no gradient (its bucket waits for `finish`). `finish()`
launches what is left, waits for all and copies back; call it before any other collective of the
data-parallel group (the pipeline schedule does, parallel/pipeline_step.py). Without `arm`,
`all_reduce()` is the same reduction after backward. The sums are bitwise the same either way
(the same buckets, the same collective, only launched earlier): tests/parallel/test_overlap.py.

Reduction is a SUM by default: the loss is normalised by GLOBAL counts (parallel/pipeline_step.py),
so each rank's gradient is already its share of the global-batch gradient and the shares add up.
`average=True` is for losses normalised per rank. `allreduce_gradients(params, group)` is the
stateless one-call form (averages by default). `reduction_group` gives the buckets a communicator
of their own on NCCL that runs on fewer SMs (parallel.dp_comm_ctas) or on a high-priority stream
(parallel.dp_comm_priority): the all-reduces overlap the backward, and every SM they hold is one the
backward's kernels lack. In-place buckets read nothing on the host, so `train.step_graph` captures them
(megaflow/step_graph.py).

`shard=True` (parallel.dp_shard_optimizer, in-place buckets only): each bucket is REDUCE-SCATTERED instead:
its first `chunk * world` elements cut into `world` equal chunks, rank r receiving the sum of chunk r
(`chunk = len // world`; NCCL's in-place form, the output a view of the input), and the few elements
left over (fewer than `world`) all-reduced. Half an all-reduce's bytes at DP2; only the owned chunk and
the remainder hold sums afterwards (parallel/dist_optimizer.py steps just those). Not here: ZeRO
(parallel/zero.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megaflow.optim import weak_hook


class _Bucket:
    def __init__(self, params: list, world: int):
        self.params, self.works = params, []
        self.flat = _adjacent_slice([p.grad for p in params])  # in place, or None: copied
        self.copied = self.flat is None
        if self.copied:
            n = sum(p.numel() for p in params) + len(params)  # + one flag per parameter
            self.flat = torch.zeros(n, dtype=params[0].dtype, device=params[0].device)
        self.chunk = self.flat.numel() // world  # shard=True: each rank's share; [chunk * world:] all-reduced
        self.pending = 0  # gradients not yet final in an armed backward


def _adjacent_slice(grads: list) -> Optional[torch.Tensor]:
    """The 1-D slice of one flat buffer that `grads` tile exactly (in any order), or None."""
    if any(g is None or g._base is None or g._base.dim() != 1 or not g.is_contiguous() for g in grads):
        return None
    base = grads[0]._base
    if any(g._base is not base for g in grads):
        return None
    spans = sorted((g.storage_offset() - base.storage_offset(), g.numel()) for g in grads)
    for (a, n), (b, _) in zip(spans, spans[1:]):
        if a + n != b:
            return None
    start = spans[0][0]
    return base[start:spans[-1][0] + spans[-1][1]]


def _fill(params: list, limit: int) -> list:
    """`params` in order, cut into runs of one dtype and device of at most `limit` bytes (at least one each)."""
    groups, cur, size = [], [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if cur and (p.dtype != cur[0].dtype or p.device != cur[0].device or size + nbytes > limit):
            groups.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    return groups + [cur] if cur else groups


class GradBuckets:
    """`params`: what gradient code works on (fp32 main weights under mixed precision, else the
    parameters), in model order. `bucket_mb`: bucket size in MiB of gradient. `last_mb` > 0: the last
    bucket holds only the first parameters of the model, at most `last_mb` MiB of them: their gradients
    are ready last, so its all-reduce, the one nothing is left to overlap, is short (0: every bucket
    up to `bucket_mb`). `shard`: reduce-scatter the buckets (see the file docstring; needs in-place buckets)."""

    def __init__(self, params, dp_group, bucket_mb: float = 25.0, average: bool = False, last_mb: float = 0.0,
                 shard: bool = False):
        self.group, self.average = dp_group, average
        self.world = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.rank = dist.get_rank(dp_group) if dp_group is not None else 0
        params = [p for p in params if p.requires_grad]
        first = _fill(params, int(last_mb * 2 ** 20))[0] if last_mb > 0 and params else []
        first = first if sum(p.numel() * p.element_size() for p in first) <= last_mb * 2 ** 20 else []
        groups = _fill(params[len(first):][::-1], int(bucket_mb * 2 ** 20)) + ([first[::-1]] if first else [])
        self.buckets = [_Bucket(g, self.world) for g in groups]
        self.shard = shard and self.world > 1
        if self.shard and any(b.copied for b in self.buckets):
            raise ValueError("parallel.dp_shard_optimizer=on reduce-scatters buckets that are slices of the flat fp32 "
                             "main-gradient buffer (bf16 weights); this run's copy gradients (fp32 weights, "
                             "train.param_dtype=fp32); set train.param_dtype=bf16 or parallel.dp_shard_optimizer=auto (off here)")
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}  # param -> its bucket's index
        self.chunks, self.armed, self.counting, self.next = [], set(), False, 0  # overlap state (`attach`)
        self.early = 0  # buckets launched during backward in the last step

    # ----- overlap with backward ----------------------------------------------------------------------
    def attach(self, chunks: list, main_of=None) -> None:
        """Count final gradients during backward. `chunks`: one list per model chunk of the tensors
        autograd accumulates into (the bf16 model parameters under mixed precision); `main_of(p)` is
        the bucketed tensor of `p` (default p itself). Register after any hook that moves gradients
        (MainWeights' fp32 accumulation): hooks run in registration order."""
        if self.world == 1:
            return
        main_of = main_of or (lambda p: p)
        self.chunks = [[p for p in ps if p.requires_grad and id(main_of(p)) in self.where] for ps in chunks]
        for ps in self.chunks:
            for p in ps:
                index = self.where[id(main_of(p))]
                p.register_post_accumulate_grad_hook(weak_hook(self, lambda buckets, q, i=index: buckets._ready(i, q)))

    def arm(self, chunk: int = 0) -> None:
        """The next backward over `chunk` is its last of this step: its gradients become final."""
        if self.world == 1 or chunk >= len(self.chunks):
            return
        if not self.counting:  # first armed chunk of the step: count every bucket's gradients again
            for b in self.buckets:
                b.pending = len(b.params)
            self.counting, self.next, self.early = True, 0, 0
        self.armed.update(id(p) for p in self.chunks[chunk])

    def _ready(self, index: int, p: torch.Tensor) -> None:
        """Parameter `p` of bucket `index` has its gradient of this backward (a hook: see `attach`)."""
        if id(p) in self.armed:
            self.armed.discard(id(p))  # counted once, even if a chunk is re-armed
            self.buckets[index].pending -= 1
            while self.next < len(self.buckets) and self.buckets[self.next].pending == 0:
                self._launch(self.buckets[self.next])
                self.next += 1
                self.early += 1

    # ----- the reduction ------------------------------------------------------------------------------
    @torch.no_grad()
    def _launch(self, b: _Bucket) -> None:
        if b.copied:
            off, flat = 0, b.flat
            for p in b.params:
                n = p.numel()
                if p.grad is None:
                    flat[off:off + n].zero_()
                else:
                    flat[off:off + n].copy_(p.grad.reshape(-1))
                off += n
            # 1 where this rank has a gradient
            flat[off:].copy_(torch.tensor([float(p.grad is not None) for p in b.params], dtype=flat.dtype))
        whole = b.chunk * self.world if self.shard else 0
        if whole:  # in place: rank r's chunk of the bucket receives the sum of every rank's chunk r
            mine = b.flat[self.rank * b.chunk:(self.rank + 1) * b.chunk]
            b.works.append(dist.reduce_scatter_tensor(mine, b.flat[:whole], group=self.group, async_op=True))
        if whole < b.flat.numel():
            b.works.append(dist.all_reduce(b.flat[whole:], group=self.group, async_op=True))

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not launched during backward (in order), wait for all, copy back."""
        if self.world == 1:
            return
        for b in self.buckets:
            if not b.works:
                self._launch(b)
        self.armed.clear()
        self.counting = False
        for b in self.buckets:
            for work in b.works:
                work.wait()
            b.works = []
            if self.average:  # (shard: other ranks' chunks hold no sums; divided too, read by nobody)
                b.flat.div_(self.world)
            if b.copied:
                off, flags = 0, b.flat[-len(b.params):].tolist()
                for p, flag in zip(b.params, flags):
                    n = p.numel()
                    if flag > 0:
                        if p.grad is None:
                            p.grad = torch.empty_like(p)
                        p.grad.copy_(b.flat[off:off + n].view_as(p))
                    off += n

    def all_reduce(self) -> None:
        """The whole reduction after backward (nothing armed)."""
        self.finish()

    def __repr__(self):
        sizes = [f"{b.flat.numel() * b.flat.element_size() / 2 ** 20:.1f}MiB{'' if b.copied else ' in place'}"
                 for b in self.buckets]
        return f"GradBuckets({len(self.buckets)} buckets: {', '.join(sizes)}, dp={self.world}{', sharded' if self.shard else ''})"


def reduction_group(topo, max_ctas: int, high_priority: bool = False):
    """The group the gradient buckets all-reduce over: `topo.dp_group`, or, on NCCL with max_ctas > 0 or
    high_priority, a copy of it whose communicator launches at most `max_ctas` CTAs (one SM each) per
    collective (NCCL's per-communicator maxCTAs, as Megatron's communicator configs set it) and whose
    stream has the device's highest priority (the all-reduce's kernels are scheduled ahead of the
    backward's when both wait for SMs; a CUDA graph keeps that priority per kernel: torch instantiates
    graphs with cudaGraphInstantiateFlagUseNodePriority). Every rank must call it, with the same values
    (it creates one group per data-parallel group, as Topology does)."""
    if (max_ctas <= 0 and not high_priority) or topo.dp_group is None or topo.dp == 1 or \
            dist.get_backend(topo.dp_group) != "nccl":
        return topo.dp_group
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=high_priority)
    if max_ctas > 0:
        options.config.max_ctas = max_ctas
        options.config.min_ctas = 1
    mine = None
    for ranks in topo.dp_rank_lists():
        group = dist.new_group(ranks, pg_options=options)
        if topo.rank in ranks:
            mine = group
    return mine


def allreduce_gradients(params, dp_group, average: bool = True, bucket_mb: float = 25.0) -> None:
    """One call, no state kept: bucket and all-reduce `params`' gradients over `dp_group`. The
    default `average=True` fits a loss normalised by each rank's OWN counts (megaflow.train's plain
    engine); with global-count normalisation pass average=False. Allocates the buckets on every call:
    a loop that runs many steps should keep a `GradBuckets`."""
    GradBuckets(params, dp_group, bucket_mb, average).all_reduce()
