"""The training engine without ZeRO for any TP x PP x DP layout: our pipeline schedule (one stage
when pp == 1), a bucketed data-parallel gradient SUM (overlapped with the last backward when
parallel.overlap is on), a gradient-norm clip that counts every element
of the model once across TP and PP, and AdamW. Same interface as megaflow.train.PlainEngine and
parallel.zero.ZeroEngine: `train_step(batch, noise, keep, lr)` -> {'loss', 'grad_norm', metrics}, here
(as PlainEngine's) 0-d device tensors that nothing reads back during the step.

Exactness. The loss of each micro-batch is normalised by the step's GLOBAL counts (summed over DP
before any forward, parallel/pipeline_step.py), so the DP sum of the gradients is the gradient of
the global batch and a DP run equals one process on the concatenated batch. The clipping norm is
the single-process one: squares of TP shards summed over the TP group (a flow shard replicated
tp / flow_tp times counted once; replicated k/v rows of a fused QKV shard once), replicated
parameters counted on TP rank 0 only, the last
stage's copy of an embedding tied across stages not at all; then summed over the pipeline. That
is `zero_mpu.mark_model_parallel`'s rule, applied here without DeepSpeed.

Not here: building and loading the stages (parallel/runtime.py), checkpoint files
(parallel/checkpoint.py), ZeRO (parallel/zero.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megaflow.optim import MainWeights, param_groups, resolve_param_dtype, set_lr
from megaflow.speed import apply_speedups
from megaflow.step_graph import StepGraph, check_step_graph
from parallel.backend import fp8_forward
from parallel.checkpoint_tp import shard_layout
from parallel.comm import group_rank, group_size
from parallel.data_parallel import GradBuckets, reduction_group
from parallel.dist_optimizer import DistributedOptimizer
from parallel.fused import parts_layout, pieces
from parallel.pipeline import stage_parameters
from parallel.pipeline_step import PipelineSchedule
from parallel.wgrad_fusion import apply_wgrad_fusion, fusion_wanted


def norm_counted(stages: list, topo, tied=None) -> dict:
    """{id(parameter): True if this rank counts it in the global gradient norm, or the rows it
    counts ((start, rows), ...): a fused QKV shard whose k/v rows are replicated (fewer key/value
    heads than ranks) counts them on its group's first rank only}."""
    tied_copy = tied.weight if tied is not None and tied.group is not None and not topo.is_first_stage else None
    counted = {}
    for st in stages:
        layout, fused = shard_layout(st.module), parts_layout(st.module)
        for name, p in st.module.named_parameters():
            if name in layout:
                group = layout[name][1]
                flow_replica = group is topo.flow_tp_group and topo.flow_tp < topo.tp and topo.tp_rank >= topo.flow_tp
                counted[id(p)] = not flow_replica
                parts = fused.get(name, ())
                if counted[id(p)] and group_rank(group) > 0 and not all(sharded for _, sharded in parts):
                    own = pieces(parts, group_size(group), group_rank(group))
                    counted[id(p)] = tuple((x.local, x.rows) for x in own if parts[x.part][1])
            else:
                counted[id(p)] = topo.tp_rank == 0
    if tied_copy is not None:
        counted[id(tied_copy)] = False
    return counted


@torch.no_grad()
def global_grad_norm(params: list, counted: dict, topo) -> torch.Tensor:
    """The 2-norm of the gradients of a model split by TP and PP, each element counted once (see the
    file docstring): 0-d, on the device, the same on every rank. Nothing is scaled here."""
    mine = [p.grad if counted[id(p)] is True else torch.cat([p.grad.narrow(0, *r) for r in counted[id(p)]])
            for p in params if p.grad is not None and counted[id(p)]]
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if mine:
        sq = torch.stack(torch._foreach_norm(mine)).float().pow(2).sum()
    for group, size in ((topo.tp_group, topo.tp), (topo.pp_group, topo.pp)):
        if group is not None and size > 1:
            dist.all_reduce(sq, group=group)
    return sq.sqrt()


class ParallelEngine:
    """One optimizer step per `train_step` over this rank's pipeline stages (loaded or initialised).

    stages  parallel.pipeline.split_stages(...) of this rank, materialised
    cfg     the run's Config (train: optimizer, grad_clip; parallel: schedule, micro_batches)
    dtype   autocast dtype or None (fp32)
    topo    parallel.topology.Topology of this rank
    tied    parallel.pipeline.TiedEmbeddings (every rank constructs it)
    """

    def __init__(self, stages: list, cfg, dtype, topo, tied=None, bucket_mb: Optional[float] = None):
        self.stages, self.cfg, self.dtype, self.topo = stages, cfg, dtype, topo
        pcfg, tcfg = cfg.parallel, cfg.train
        params = stage_parameters(stages)
        if not params:
            raise ValueError("no trainable parameters on this rank in this curriculum stage; check model.stage")
        counted = norm_counted(stages, topo, tied)
        modules = nn.ModuleList([st.module for st in stages])
        device = params[0].device
        # bf16 parameters with fp32 main weights and gradients (megaflow/optim.py), or fp32 throughout
        self.param_dtype = resolve_param_dtype(tcfg.param_dtype, dtype, device)
        self.weights = MainWeights(modules, param_groups(modules, tcfg.weight_decay), tcfg, self.param_dtype,
                                   flat_grads=False)  # hooks: micro-batches accumulate in fp32
        self.optimizer = self.weights.optimizer
        # the flat one-pass AdamW (megaflow/flat_adamw.py), as PlainEngine steps: weights, moments and the
        # bf16 copy in one kernel instead of torch's fused AdamW + a refresh copy. Every main gradient is
        # written each step (the hooks, then settle_grads), so every weight steps, as the kernel assumes
        self.weights.flat_step = self.weights.mixed and bool(self.optimizer.defaults.get("fused"))
        # parallel.grad_accum_fusion: each linear's weight-gradient GEMM adds into its fp32 main gradient
        # (parallel/wgrad_fusion.py): no bf16 .grad and no flush after each micro-batch's backward
        if fusion_wanted(pcfg.grad_accum_fusion, self.weights.mixed, pcfg.micro_batches, device, topo.dp, pcfg.overlap,
                         topo.tp):
            fused = apply_wgrad_fusion([modules], lambda w: self.weights.main_of(w).grad)
            self.weights.wgrad_fused = {id(w) for w in fused}
        self.params = [self.weights.main_of(p) for p in params]  # what gradient code works on
        self.counted = {id(self.weights.main_of(p)): counted[id(p)] for p in params}
        if tied is not None and tied.group is not None and self.weights.mixed:
            tied.weight = self.weights.main_of(tied.weight)  # the tied gradients are summed in fp32
        self.buckets = GradBuckets(self.params, reduction_group(topo, pcfg.dp_comm_ctas, pcfg.dp_comm_priority),
                                   bucket_mb=bucket_mb or pcfg.bucket_mb, last_mb=pcfg.last_bucket_mb,
                                   shard=pcfg.shard_optimizer(self.weights.mixed))
        # parallel.dp_shard_optimizer: reduce-scatter, AdamW on this rank's shard, all-gather (parallel/dist_optimizer.py)
        self.sharded = DistributedOptimizer(self.weights, self.buckets) if self.buckets.shard else None
        if pcfg.overlap:  # reduce buckets during the last backward (after MainWeights' fp32 hooks)
            self.buckets.attach([list(st.module.parameters()) for st in stages], self.weights.main_of)
        self.schedule = PipelineSchedule(stages, topo, pcfg.schedule, pcfg.micro_batches, tied=tied,
                                         grad_sync=self.buckets if pcfg.overlap else None, overlap=pcfg.overlap,
                                         settle_grads=self.weights.settle_grads if self.weights.mixed else None,
                                         main_grads=self.weights if self.weights.mixed else None,
                                         forward_context=fp8_forward(pcfg.te_fp8, list(modules), topo.amax_group,
                                                                     pcfg.micro_batches))
        # train.compile=auto compiles under TP too: the collectives are functional (parallel/comm.py), and
        # compiled TP=2 trains on eager TP=2's losses on 2 H200s (docs/benchmarks.md, issue 17)
        self.speedups = [apply_speedups(m, tcfg, device) for m in modules]
        # train.step_graph=on: the whole step as one CUDA graph (megaflow/step_graph.py; the TP group's, the
        # data-parallel buckets' (in place: bf16 weights) and the pipeline's NCCL ops captured in it: each rank's
        # whole schedule). Every layout keeps the flat one-pass AdamW in the graph, over this rank's own shards
        # (TP-only graphs stepped torch's fused AdamW until session 9: ~1.5 ms more a TP2 step on h200_1b)
        self.graph = None
        copied = topo.dp > 1 and any(b.copied for b in self.buckets.buckets)
        if check_step_graph(tcfg.step_graph, device, tcfg.compile_mode, parallel=pcfg, copied_buckets=copied,
                            dp=topo.dp):
            self.graph = StepGraph(self._step, self.optimizer, device)

    def train_step(self, batch: dict, noise, keep, lr: float) -> dict:
        """One step (as one replayed CUDA graph under train.step_graph=on)."""
        if self.sharded is not None:
            self.sharded.stale = True  # the fp32 state of other ranks' shards, from this step on
        if self.graph is not None:
            return self.graph(batch, noise, keep, lr)
        return self._step(batch, noise, keep, lr)

    def _step(self, batch: dict, noise, keep, lr) -> dict:
        for st in self.stages:
            st.module.train()
        set_lr(self.optimizer, lr)
        self.weights.zero_grad()
        with torch.autocast(batch["tokens"].device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss, metrics = self.schedule.step(batch, noise, keep)
        if not self.cfg.parallel.overlap:
            self.buckets.all_reduce()
        if self.sharded is None:
            norm = global_grad_norm(self.params, self.counted, self.topo)
        else:  # parallel.dp_shard_optimizer: each rank holds the sums of its shard only
            norm = self.sharded.grad_norm()
        # clip (on CUDA inside the fused AdamW: no pass of its own over the gradients), then step unless
        # NaN/Inf. The norm is global (summed over TP and PP of DP-summed gradients), so every rank sees
        # the same value and skips the same steps without another collective.
        norm, skipped = self.weights.clip_and_step(self.cfg.train.grad_clip, norm)
        if self.sharded is not None:
            self.sharded.finish()  # the bf16 weights' all-gathers, launched chunk by chunk during the step
        # 0-d device tensors, as PlainEngine's: the step never waits for the GPU (the loop reads them back
        # at log steps, megaflow.model.starflow.read_metrics); a float() here cost 7 host syncs a step
        return {"loss": loss.detach(), "grad_norm": norm.detach(), "skipped": skipped, **metrics}

    def model_state_dict(self, copy: bool = True) -> dict:
        """This rank's entries of the model state dict (full-model names, TP shards); copy=False:
        nothing copied, to read only (MainWeights.full_precision_state). Collective under parallel.dp_shard_optimizer."""
        if self.sharded is not None:
            self.sharded.sync_state()
        out = {}
        for st in self.stages:  # fp32 main weights under mixed precision
            out.update({k: v.detach() for k, v in self.weights.full_precision_state(st.module, copy).items()})
        return out

    def state_dict(self) -> dict:
        """This rank's optimizer state (identical on the DP replicas of one TP x PP coordinate). Collective under
        parallel.dp_shard_optimizer."""
        if self.sharded is not None:
            self.sharded.sync_state()
        t = self.topo
        return {"optimizer": self.optimizer.state_dict(), "tp": t.tp, "pp": t.pp, "flow_tp": t.flow_tp,
                "tp_rank": t.tp_rank, "pp_rank": t.pp_rank, "n_params": len(self.params)}

    def load_state_dict(self, state: dict) -> None:
        t = self.topo
        saved = (state.get("tp"), state.get("pp"), state.get("flow_tp"))
        if saved != (t.tp, t.pp, t.flow_tp) or state.get("n_params") != len(self.params):
            raise ValueError(f"the optimizer state was saved with tp, pp, flow_tp = {saved} and "
                             f"{state.get('n_params')} parameters on this coordinate; this run has "
                             f"{(t.tp, t.pp, t.flow_tp)} and {len(self.params)}: resume with the same "
                             f"parallel.tp / pp / flow_tp (the data-parallel degree may change)")
        self.optimizer.load_state_dict(state["optimizer"])
