"""The distributed optimizer (`parallel.dp_shard_optimizer`; its default, `auto`, turns it on where it applies):
Megatron's "distributed optimizer", ZeRO-1 in our own gradient buckets, for ParallelEngine's data parallelism
(bf16 weights, fp32 main weights).

A step, on every data-parallel rank:
  1. backward: each bucket of fp32 main gradients (parallel/data_parallel.py GradBuckets, `shard=True`) is
     REDUCE-SCATTERED as it fills: rank r gets the sum of its chunk r of the bucket (half the bytes of an
     all-reduce at DP2, half the NCCL time beside the backward). Elements left over when a bucket does
     not split evenly (fewer than the DP degree) are all-reduced: every rank owns them;
  2. the gradient norm over the shards: each rank's squares of what it owns (the remainder counted on
     rank 0 only), one all-reduce of the sum over DP;
  3. the flat AdamW (megaflow/flat_adamw.py, clip and skip on the device as before) steps only this rank's
     chunks: its fp32 main weights and moments there, and the bf16 weights there (half the optimizer's
     memory traffic at DP2);
  4. after each chunk's AdamW, that bucket's bf16 weights are ALL-GATHERED in place (a quarter of an fp32
     all-reduce's bytes) while the next chunk steps; the step waits for them at its end.
Everything stays in the flat buffers of megaflow/optim.py MainWeights and reads nothing on the host, so
`train.step_graph` captures it as it captures the all-reduce path.

What is not sharded: memory. The fp32 main weights and moments keep their full size on every rank; the parts
other ranks own go stale, and `sync_state()` all-gathers them (fp32, in place) whenever the whole state is
read: checkpoints (parallel/checkpoint_state.py state_to_save), `model_state_dict`, the optimizer's state.
So a checkpoint is the same as the all-reduce path's (DCP boxes of whole tensors): it resumes at any layout,
sharded or not, and a sharded run resumes any checkpoint (every rank loads the whole state and steps its part).
Data parallelism alone (tp = pp = 1: ParallelConfig refuses the rest), in-place buckets (bf16 weights).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaflow.optim import MainWeights
from parallel.data_parallel import GradBuckets


class DistributedOptimizer:
    """This rank's shard of `weights`' flat buffers, as `buckets` (sharded) cut them: the flat AdamW is pointed
    at it (`weights.ranges`), each owned chunk followed by its bucket's all-gather."""

    def __init__(self, weights: MainWeights, buckets: GradBuckets):
        self.weights, self.buckets = weights, buckets
        self.group, self.world, self.rank = buckets.group, buckets.world, buckets.rank
        base = weights.flat_main_grad.storage_offset()
        # per bucket: (start, whole, end) in the flat buffers; [start, start + whole) splits into `world` chunks
        starts = [b.flat.storage_offset() - base for b in buckets.buckets]
        self.spans = [(s, b.chunk * self.world, s + b.flat.numel()) for s, b in zip(starts, buckets.buckets)]
        self.gathers, self.stale = [], False
        ranges = []
        for i, (s, whole, end) in enumerate(self.spans):
            chunk = whole // self.world
            if chunk:
                ranges.append((s + self.rank * chunk, s + (self.rank + 1) * chunk, lambda i=i: self._gather(i)))
            if s + whole < end:  # the remainder: every rank has its sum and steps it alike
                ranges.append((s + whole, end, None))
        weights.ranges = ranges
        # the sharded step is the flat one; where it cannot run, torch's AdamW steps every weight and the
        # all-gathers then overwrite what other ranks own (MainWeights.step)
        weights.flat_step = weights.mixed

    def _owned(self, flat: torch.Tensor, i: int) -> tuple:
        """(bucket i's whole-chunk span of `flat`, this rank's chunk of it)."""
        s, whole, _ = self.spans[i]
        chunk = whole // self.world
        return flat[s:s + whole], flat[s + self.rank * chunk:s + (self.rank + 1) * chunk]

    def _gather(self, i: int, flat=None, wait: bool = False) -> None:
        out, mine = self._owned(self.weights.flat_param if flat is None else flat, i)
        work = dist.all_gather_into_tensor(out, mine, group=self.group, async_op=True)  # in place
        work.wait() if wait else self.gathers.append(work)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the DP-summed fp32 gradients (0-d, the same on every rank) from the shards: each element
        counted once (tp = pp = 1: no other rule applies)."""
        grad = self.weights.flat_main_grad
        parts = [self._owned(grad, i)[1] for i in range(len(self.spans))]
        if self.rank == 0:
            parts += [grad[s + whole:end] for s, whole, end in self.spans]
        parts = [p for p in parts if p.numel()]
        sq = torch.stack(torch._foreach_norm(parts)).pow(2).sum() if parts else grad.new_zeros(())
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt()

    def finish(self) -> None:
        """Wait for the step's all-gathers (a stream-to-stream wait on CUDA). The fp32 state of the chunks other
        ranks own is stale after a step (`stale`, set by ParallelEngine.train_step: a graph replays this code)."""
        for work in self.gathers:
            work.wait()
        self.gathers = []

    @torch.no_grad()
    def sync_state(self) -> None:
        """Collective, when the whole state is to be read: the fp32 main weights and AdamW moments of the chunks
        other ranks own, all-gathered in place, so every rank holds what the all-reduce path holds."""
        if not self.stale:
            return
        w = self.weights
        w._flat_moments()  # the moments as views of the flat buffers (after torch's AdamW stepped or a load)
        for flat in (w.flat_main, w._flat[0][0], w._flat[0][1]):
            for i, (_, whole, _) in enumerate(self.spans):
                if whole:
                    self._gather(i, flat, wait=True)
        self.stale = False
