"""Run one training (or evaluation) step of a pipelined STARFlow2: micro-batches through the stages
in the order parallel/schedules.py gives, with gradient accumulation.

Loss normalisation uses GLOBAL counts: `loss_counts` of the whole step's batch, summed over the
data-parallel group, computed before any forward. Each micro-batch's loss is
`combine(terms_of_micro_batch, global_counts)`, which is linear in the summed terms, so the sum over
micro-batches and data-parallel ranks is exactly the unsplit model's loss on the global batch, and
backward of each micro-batch loss with gradient 1 accumulates exactly its gradient. No
1/micro_batches scaling anywhere; the data-parallel reduction is a SUM (parallel/data_parallel.py).

Data-parallel overlap: with `grad_sync` (parallel/data_parallel.py GradBuckets, attached), the
schedule arms it just before the last backward of each model chunk, so buckets are all-reduced while
the remaining backwards run, and finishes it before the tied-embedding and loss reductions (no other
data-parallel collective may come between). Without it the caller reduces after `step`.
Not here: the optimizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Optional

import torch
import torch.distributed as dist

from megaflow.model.layers import AttnContext
from megaflow.model.masks import mask_rows
from megaflow.model.starflow import metric_tensors
from parallel.pipeline_comm import PipelineComm, state_dtypes, state_shapes
from parallel.schedules import check_schedule, rank_actions

TERM_KEYS = ("flow_sum", "z_sq_sum", "penalty_sum", "text_sum")


def split_batch(batch: dict, micro_batches: int) -> list:
    """Split every tensor of the batch along rows into `micro_batches` equal parts."""
    B = batch["tokens"].shape[0]
    if B % micro_batches:
        raise ValueError(f"batch size {B} (per data-parallel rank) is not divisible by parallel.micro_batches="
                         f"{micro_batches}; choose a micro-batch count that divides it")
    parts = [dict() for _ in range(micro_batches)]
    for k, v in batch.items():
        chunks = v.chunk(micro_batches) if isinstance(v, torch.Tensor) else [v] * micro_batches
        for p, c in zip(parts, chunks):
            p[k] = c
    return parts


def context_rows(ctx, batch: dict, start: int, stop: int):
    """Rows start:stop of a StepContext built for the whole `batch` (masks, RoPE tables, gates): the
    micro-batch's context, the same numbers as `context` of the micro-batch itself, without building
    its masks and tables again (issue 17: host work per micro-batch). Tensors whose first dimension
    is the batch's rows are sliced (views); broadcast ones (first dimension 1) kept."""
    B = batch["tokens"].shape[0]

    def rows(x):
        if isinstance(x, AttnContext):
            return dataclasses.replace(x, cos=rows(x.cos), sin=rows(x.sin),
                                       mask=mask_rows(x.mask, batch.get("doc_ids"), start, stop))
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == B and B > 1:
            return x[start:stop]
        return x
    return dataclasses.replace(ctx, **{f.name: rows(getattr(ctx, f.name)) for f in dataclasses.fields(ctx)})


def global_counts(model, batch: dict, dp_group=None) -> dict:
    """The loss normalisers of the whole step: this rank's batch, summed over data parallelism."""
    counts = model.loss_counts(batch)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        keys = sorted(counts)
        flat = torch.stack([counts[k].to(torch.float64) for k in keys])
        dist.all_reduce(flat, group=dp_group)
        counts = {k: flat[i].round().long() for i, k in enumerate(keys)}
    return counts


class PipelineSchedule:
    """Executes this rank's action list over its stages. Construct on every rank (the transport
    creates process groups)."""

    def __init__(self, stages: list, topo, schedule: str = "1f1b", micro_batches: int = 1,
                 comm: Optional[PipelineComm] = None, tied=None, grad_sync=None, overlap: bool = True,
                 forward_context=None, settle_grads=None, main_grads=None):
        check_schedule(schedule, topo.pp, len(stages), micro_batches)
        self.stages, self.topo, self.m, self.tied = stages, topo, micro_batches, tied
        self.comm = comm or PipelineComm(topo, interleaved=schedule == "interleaved")
        self.actions = rank_actions(schedule, topo.pp, topo.pp_rank, micro_batches, len(stages))
        self.grad_sync = grad_sync
        # micro-batch index -> the context of that forward (FP8: parallel.backend.fp8_forward)
        self.forward_context = forward_context or (lambda i: contextlib.nullcontext())
        self.overlap = overlap  # post each action's receive one action ahead (parallel.overlap)
        self.settle_grads = settle_grads  # called after the last backward, before any gradient is reduced
        # megaflow.optim.MainWeights (flat_grads=False) or None: each backward's gradients go into the fp32
        # main gradients in one flush after it (`defer`), except a backward whose gradients the data-parallel
        # buckets reduce as they become ready (armed: the hooks write each one first)
        self.main_grads = main_grads
        self.last_backward = {a.chunk: i for i, a in enumerate(self.actions) if a.kind == "B"}  # chunk -> index
        self.cfg = stages[0].module.cfg
        # (micro-batch shape, forward_only) of the steps run so far: a step of a new one posts no receive
        # ahead, since its kernels launch for the first time, and inductor's autotuning of a new kernel
        # synchronises the device, which would then wait on the early receive (pipeline_comm._warm_up)
        self._seen = set()
        self.record = False  # True: keep (action, start, end) of the last step's computations (not
        # receive waits) in `timeline`; syncs the GPU around each
        self.timeline = []

    def step(self, batch: dict, noise: Optional[torch.Tensor] = None, cond_keep: Optional[torch.Tensor] = None,
             forward_only: bool = False):
        """One step on this rank's share of the batch. Returns (loss, metrics) of the global batch on
        every rank of the pipeline, as 0-d device tensors (nothing read back: `read_metrics` turns
        them into floats); gradients are accumulated into the stage parameters."""
        m, module0 = self.m, self.stages[0].module
        counts = global_counts(module0, batch, self.topo.dp_group)
        mbs = split_batch(batch, m)
        noises = noise.chunk(m) if noise is not None else [None] * m
        self._shapes = state_shapes(module0, *mbs[0]["tokens"].shape)
        self._dtype, self._device = state_dtypes(module0), batch["tokens"].device
        self._ctxs, self._saved, self.timeline = {}, {}, []
        # masks and RoPE tables once per step, each micro-batch's context a slice of them
        whole, b = module0.context(batch, cond_keep), mbs[0]["tokens"].shape[0]
        totals = torch.zeros(1 + len(TERM_KEYS), dtype=torch.float64, device=self._device)
        self._posted = {}  # action index -> Received (or None: the action receives nothing)
        seen = (tuple(mbs[0]["tokens"].shape), forward_only)
        ahead = self.overlap and seen in self._seen
        self._seen.add(seen)
        for k, a in enumerate(self.actions):
            # overlap: the next action's receive is in flight while this one computes (in action order,
            # so every link's receives stay in send order)
            for j in (k, k + 1) if ahead else (k,):
                if j < len(self.actions) and j not in self._posted:
                    self._posted[j] = self._post_recv(self.actions[j], forward_only)
            if a.kind == "F":
                i = a.micro_batch
                if i not in self._ctxs:
                    self._ctxs[i] = context_rows(whole, batch, i * b, (i + 1) * b)
                ctx = self._ctxs.pop(i) if a.chunk == len(self.stages) - 1 else self._ctxs[i]
                self._forward(a, self._posted.pop(k), mbs[i], ctx, noises[i], counts, totals, forward_only)
            elif not forward_only:
                # (at dp=1 nothing is bucketed: the backward's gradients are flushed together, as the others')
                armed = self.grad_sync is not None and self.grad_sync.world > 1 and self.last_backward[a.chunk] == k
                if armed:
                    self.grad_sync.arm(a.chunk)  # this chunk's gradients are final after this backward
                self._backward(a, self._posted.pop(k), per_parameter=armed)
        self.comm.wait_sends()
        if self.main_grads is not None:
            self.main_grads.defer = False  # outside the schedule, the hooks move each gradient again
        if self.settle_grads is not None and not forward_only:
            self.settle_grads()
        if self.grad_sync is not None and not forward_only:
            self.grad_sync.finish()
        if self.tied is not None and not forward_only:
            self.tied.all_reduce_grads()
        return self._reduce(totals, counts)

    def _post_recv(self, a, forward_only: bool):
        """Post the receive action `a` needs (None if it needs none): activations from the previous
        stage for a forward, gradients from the next one for a backward."""
        st, pp = self.stages[a.chunk], self.topo.pp
        if a.kind == "F" and not st.is_first:
            return self.comm.post_recv(self._shapes, self._dtype, self._device, "act", (st.index - 1) % pp)
        if a.kind == "B" and not forward_only and not st.is_last:
            return self.comm.post_recv(self._shapes, self._dtype, self._device, "grad", (st.index + 1) % pp)
        return None

    def _forward(self, a, received, mb: dict, ctx, noise, counts: dict, totals: torch.Tensor,
                 forward_only: bool) -> None:
        st, pp = self.stages[a.chunk], self.topo.pp
        inp = None
        if not st.is_first:
            inp = received.wait()
            if not forward_only:
                inp = tuple(t.requires_grad_() for t in inp)
        start = self._clock()  # compute only: after the receive
        with torch.set_grad_enabled(not forward_only), self.forward_context(a.micro_batch):
            out = st.forward(mb, ctx, inp, noise)
            if st.is_last:
                terms = st.module.loss_terms(out, mb)
                out = st.module.combine(terms, counts)
                totals += torch.stack([out.detach().double()] + [
                    terms[k].detach().double() if k in terms else totals.new_zeros(()) for k in TERM_KEYS])
        if not st.is_last:
            self.comm.send(out, "act", (st.index + 1) % pp)
        if not forward_only:
            self._saved[(a.chunk, a.micro_batch)] = (inp, out)
        self._record(a, start)

    def _backward(self, a, received, per_parameter: bool = False) -> None:
        st, pp = self.stages[a.chunk], self.topo.pp
        inp, out = self._saved.pop((a.chunk, a.micro_batch))
        if st.is_last:
            outs, grads = [out], [None]
        else:
            g = received.wait()
            outs, grads = [o for o in out if o.requires_grad], [gi for o, gi in zip(out, g) if o.requires_grad]
        start = self._clock()
        if self.main_grads is not None:
            self.main_grads.defer = not per_parameter
        if outs and outs[0].requires_grad:
            torch.autograd.backward(outs, grads)
        if self.main_grads is not None and self.main_grads.defer:
            self.main_grads.flush_grads()
        if not st.is_first:  # zeros where an input got no gradient: the peer waits for all four
            self.comm.send(tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in inp),
                           "grad", (st.index - 1) % pp)
        self._record(a, start)

    def _clock(self) -> float:
        if not self.record:
            return 0.0
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _record(self, a, start: float) -> None:
        if self.record:
            self.timeline.append((a, start, self._clock()))

    def _reduce(self, totals: torch.Tensor, counts: dict):
        """Sum the last stage's loss and terms over data parallelism and hand them to every stage."""
        topo = self.topo
        if topo.is_last_stage and topo.dp_group is not None and topo.dp > 1:
            dist.all_reduce(totals, group=topo.dp_group)
        if topo.pp > 1:
            dist.broadcast(totals, src=topo.pp_ranks[-1], group=topo.pp_group)
        terms = {k: totals[1 + j] for j, k in enumerate(TERM_KEYS) if k != "text_sum" or self.cfg.vlm is not None}
        return totals[0].float(), metric_tensors(terms, counts, self.cfg)

