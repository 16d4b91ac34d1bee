"""DeepSpeed ZeRO for megaflow: the optimizer state (fp32 master weights and AdamW moments) sharded
across the data-parallel ranks of each tensor/pipeline coordinate, composed with our TP and PP.

`ZeroEngine` has PlainEngine's interface (`train_step(batch, noise, keep, lr)`), plus `save(dir)` /
`load(dir)` of its sharded optimizer state (parallel/zero_checkpoint.py) and
`optimizer_state_bytes()`. Who owns what:
  - forward, backward, micro-batching: ours. PP=1: the engine's forward on `GlobalLoss` (the model
    under a loss normalised by GLOBAL counts), one `engine.backward` per micro-batch. PP>1: our
    PipelineSchedule (1F1B / interleaved), whose plain `torch.autograd.backward` calls accumulate
    into `.grad` of the stage parameters; DeepSpeed never drives the schedule.
  - gradient reduction, clipping, the AdamW step: DeepSpeed, once per step, in `engine.step()`.
    `managed_gradient_accumulation=False` makes every `step()` the accumulation boundary, so the
    number of backward calls before it is ours to choose. ZeRO-1/2 reduce with SUM (our loss is
    already normalised by global counts, as with parallel/data_parallel.py); ZeRO-3 only averages,
    so its loss is multiplied by dp.
  - the LR: `megaflow.optim.lr_at`, written into the optimizer's groups before every step (no
    DeepSpeed scheduler). Clipping: `cfg.train.grad_clip`, DeepSpeed's `gradient_clipping`, with
    a norm over TP x PP that counts every parameter once (`mark_model_parallel`).
Not here: building or splitting the model (build order: meta -> TP -> PP split -> load -> this).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megaflow.model.starflow import read_metrics
from megaflow.optim import param_groups, set_lr
from megaflow.speed import apply_speedups
from megaflow.step_graph import check_step_graph
from parallel.backend import fp8_forward
from parallel.pipeline_step import TERM_KEYS, global_counts, split_batch
from parallel.zero_mpu import TopologyMPU, mark_model_parallel

REPO = Path(__file__).resolve().parents[1]


def import_deepspeed(device_type: str):
    """Import DeepSpeed for `device_type`: on CPU it needs DS_ACCELERATOR=cpu before the import;
    its small C++ extension is compiled once into .torch_extensions (git-ignored)."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    import deepspeed
    name = deepspeed.get_accelerator().device_name()
    if (device_type == "cpu") != (name == "cpu"):
        raise RuntimeError(f"DeepSpeed was imported for accelerator {name!r} but the model is on {device_type!r}; "
                           f"set DS_ACCELERATOR={'cpu' if device_type == 'cpu' else 'cuda'} before importing it")
    return deepspeed


def build_ds_config(cfg, dtype: Optional[torch.dtype] = None) -> dict:
    """DeepSpeed's config from ours: ZeRO stage (cfg.parallel), clipping (cfg.train.grad_clip), bf16
    parameters with fp32 master weights when `dtype` is bf16 (else fp32 throughout). No optimizer
    and no scheduler: the optimizer is ours (AdamW, megaflow.optim) and the LR comes from lr_at."""
    stage, pp = cfg.parallel.zero_stage, cfg.parallel.pp
    if stage not in (1, 2, 3):
        raise ValueError(f"parallel.zero_stage={stage}: ZeroEngine needs 1, 2 or 3 (0 = PlainEngine)")
    if stage > 1 and pp > 1:
        raise ValueError(f"parallel.zero_stage={stage} with parallel.pp={pp}: ZeRO-2/3 partition gradients (or "
                         f"weights) during backward, which the pipeline schedule's micro-batch accumulation and "
                         f"stage-local parameters do not support; use zero_stage=1 with pp > 1")
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"ZeroEngine supports fp32 and bf16, not {dtype}")
    # overlap_comm (parallel.overlap): ZeRO-2/3 reduce-scatter gradient buckets during backward on a side
    # stream. ZeRO-1 reduces once, at step() (our micro-batches accumulate first), so there is nothing to overlap.
    zero = {"stage": stage, "reduce_scatter": True, "contiguous_gradients": True,
            "overlap_comm": bool(cfg.parallel.overlap) and stage >= 2,
            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50_000_000)
    return {
        "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's batch bookkeeping only: batches are ours
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # every step() is the boundary; micro-batches are ours
        "gradient_clipping": float(cfg.train.grad_clip),
        "gradient_allreduce_op": "mean" if stage == 3 else "sum",  # ZeRO-3 has no sum: loss x dp instead
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW (exact, fused on GPU)
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


def optimizer_groups(module: nn.Module, weight_decay: float, no_decay: list) -> list:
    """megaflow.optim.param_groups, with the parameters in `no_decay` moved to the no-decay group: the
    last stage's LM-head copy of an embedding tied across pipeline stages is named `lm_head.weight`
    there, but must decay like the embedding it copies (not at all), as in one process."""
    groups = param_groups(module, weight_decay)
    moved = [p for g in groups for p in g["params"] if any(p is q for q in no_decay)]
    if not moved:
        return groups
    groups = [{**g, "params": [p for p in g["params"] if all(p is not q for q in moved)]} for g in groups]
    plain = [g for g in groups if g["weight_decay"] == 0.0]
    if plain:
        plain[0]["params"] += moved
    else:
        groups.append({"params": moved, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def master_partitions(zero_optimizer) -> list:
    """This rank's flat fp32 master partitions, one per parameter (sub)group: the tensors the inner
    AdamW steps and keys its state by (ZeRO-1/2 and ZeRO-3 name them differently)."""
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        return list(zero_optimizer.single_partition_of_fp32_groups)
    return list(zero_optimizer.fp32_partitioned_groups_flat)


class GlobalLoss(nn.Module):
    """The model's loss on one micro-batch, normalised by the step's GLOBAL counts (so the gradient
    sum over micro-batches and data-parallel ranks is the global-batch gradient). A module so that
    DeepSpeed's engine (and ZeRO-3's parameter fetching) sees the forward; the model's own direct
    parameters (flow_start) are registered as external so ZeRO-3 gathers them here."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, noise, keep, counts: dict):
        m = self.model
        terms = m.terms(batch, noise, keep)
        return m.combine(terms, counts), terms


class ZeroEngine:
    """One optimizer step per `train_step` with DeepSpeed ZeRO (stage cfg.parallel.zero_stage).

    model   the (tensor-parallel) model, PP=1; or None with `stages` (this rank's pipeline stages from
            parallel.pipeline.split_stages, loaded), which our schedule runs
    cfg     the run's Config (train: optimizer, grad_clip; parallel: zero_stage, micro_batches, schedule)
    dtype   None / torch.float32 (fp32 throughout) or torch.bfloat16 (bf16 parameters, fp32 master)
    topo    parallel.topology.Topology of this rank
    tied    parallel.pipeline.TiedEmbeddings when stages hold tied embeddings (optional)
    """

    def __init__(self, model: Optional[nn.Module], cfg, dtype, topo, stages: Optional[list] = None, tied=None):
        self.cfg, self.topo, self.stages = cfg, topo, stages
        self.dtype = None if dtype == torch.float32 else dtype
        self.stage = cfg.parallel.zero_stage
        modules = [st.module for st in stages] if stages is not None else [model]
        device = next(p.device for m in modules for p in m.parameters())
        check_step_graph(cfg.train.step_graph, device, cfg.train.compile_mode, parallel=cfg.parallel)  # refuses ZeRO
        deepspeed = import_deepspeed(device.type)
        self.ds_config = build_ds_config(cfg, self.dtype)
        self.fp8 = fp8_forward(cfg.parallel.te_fp8, modules, topo.amax_group, cfg.parallel.micro_batches)
        if stages is not None:
            from parallel.pipeline_step import PipelineSchedule
            self.module = nn.ModuleList(modules)
            self.schedule = PipelineSchedule(stages, topo, cfg.parallel.schedule, cfg.parallel.micro_batches, tied=tied,
                                             forward_context=self.fp8)
        else:
            self.module, self.schedule = GlobalLoss(model), None
        # full-model parameter names (as in STARFlow2.state_dict()), each parameter once
        self.named, seen = {}, set()
        for m in modules:
            for name, p in m.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.named[name] = (p, m)
        # activation checkpointing and per-block compilation (megaflow/speed.py); DeepSpeed's ZeRO-3
        # parameter fetching runs in module hooks inside the blocks, so 'auto' leaves compile off there
        # (TP's collectives are functional and compile: parallel/comm.py)
        tcfg = cfg.train
        if self.stage == 3 and tcfg.compile == "auto":
            import dataclasses
            tcfg = dataclasses.replace(tcfg, compile="off")
        self.speedups = [apply_speedups(m, tcfg, device) for m in modules]
        tied_copy = tied.weight if tied is not None and tied.group is not None and not topo.is_first_stage else None
        mark_model_parallel(self.named, topo, tied_copy)
        groups = optimizer_groups(self.module, cfg.train.weight_decay, [tied_copy] if tied_copy is not None else [])
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr,
                                      betas=(cfg.train.beta1, cfg.train.beta2),
                                      **({"fused": True} if device.type == "cuda" else {}))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                 config=self.ds_config, mpu=TopologyMPU(topo))
        if self.stage == 3:
            for p in model.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(self.module, p)
        if self.dtype is not None:
            self._reanchor(modules)

    def _reanchor(self, modules: list) -> None:
        """Stage views read the model dtype from a stand-in buffer for `flow_in` (parallel/pipeline.py);
        DeepSpeed cast the parameters to bf16 but keeps buffers, so follow it."""
        for m in modules:
            anchor = m.flow_in
            if not isinstance(anchor.weight, nn.Parameter):
                anchor.weight = anchor.weight.to(self.dtype)

    # ----- one step --------------------------------------------------------------------------------
    def train_step(self, batch: dict, noise, keep, lr: float) -> dict:
        self.engine.train()
        set_lr(self.optimizer, lr)
        device = batch["tokens"].device
        if self.dtype is not None:  # bf16 parameters: images and noise in the parameters' dtype
            batch = {k: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                     for k, v in batch.items()}
            noise = noise.to(self.dtype) if noise is not None else None
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if self.schedule is not None:
                loss, metrics = self.schedule.step(batch, noise, keep)
                metrics = read_metrics(metrics)
            else:
                loss, metrics = self._forward_backward(batch, noise, keep)
        self.engine.step()  # skips the update itself on NaN/Inf gradients (the flag agreed over DP and TP x PP)
        norm = self.engine.get_global_grad_norm()
        skipped = bool(getattr(self.optimizer, "overflow", False))
        return {"loss": float(loss), "grad_norm": float(norm) if norm is not None else float("nan"),
                "skipped": skipped, **metrics}

    def _forward_backward(self, batch: dict, noise, keep):
        from megaflow.model.starflow import metrics_from
        model, topo = self.module.model, self.topo
        counts = global_counts(model, batch, topo.dp_group)
        m = self.cfg.parallel.micro_batches
        mbs = split_batch(batch, m)
        noises = noise.chunk(m) if noise is not None else [None] * m
        keeps = keep.chunk(m) if keep is not None else [None] * m
        scale = topo.dp if self.stage == 3 else 1  # ZeRO-3 averages over dp; our loss wants the sum
        totals = torch.zeros(1 + len(TERM_KEYS), dtype=torch.float64, device=batch["tokens"].device)
        for i, (mb, nz, kp) in enumerate(zip(mbs, noises, keeps)):
            with self.fp8(i):
                loss, terms = self.engine(mb, nz, kp, counts)
            self.engine.backward(loss * scale if scale != 1 else loss)
            totals += torch.stack([loss.detach().double()] + [
                terms[k].detach().double() if k in terms else totals.new_zeros(()) for k in TERM_KEYS])
        if topo.dp > 1:
            dist.all_reduce(totals, group=topo.dp_group)
        terms = {k: totals[1 + j] for j, k in enumerate(TERM_KEYS) if k != "text_sum" or model.cfg.vlm is not None}
        return totals[0].float(), metrics_from(terms, counts, model.cfg)

    # ----- state -----------------------------------------------------------------------------------
    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: its fp32 master partitions (what the inner
        AdamW steps) and their moments (exp_avg, exp_avg_sq); scalars (step) not counted."""
        masters = master_partitions(self.optimizer)
        state = self.optimizer.optimizer.state
        total = 0
        for flat in masters:
            total += flat.numel() * flat.element_size()
            for v in state.get(flat, {}).values():
                if torch.is_tensor(v) and v.numel() > 1:
                    total += v.numel() * v.element_size()
        return total

    def save(self, directory) -> Path:
        from parallel.zero_checkpoint import save_zero_state
        return save_zero_state(self, Path(directory))

    def load(self, directory) -> None:
        from parallel.zero_checkpoint import load_zero_state
        load_zero_state(self, Path(directory))

    def model_state_dict(self) -> dict:
        """This rank's module state dict (its TP shards / PP stages, full-model names) with every
        trainable parameter at its fp32 master value: what model.pt should hold under ZeRO (the
        module's own parameters are bf16, or ZeRO-3 partitions). Collective over the DP group."""
        from contextlib import nullcontext
        from deepspeed.utils import safe_get_full_fp32_param
        deepspeed = import_deepspeed(next(self.module.parameters()).device.type)
        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params) if self.stage == 3 else nullcontext():
            modules = self.module if self.schedule is not None else [self.module.model]
            out = {k: v.detach().clone() for m in modules for k, v in m.state_dict().items()}
        for name, (p, _) in self.named.items():
            out[name] = safe_get_full_fp32_param(p).reshape(out[name].shape).clone()
        return out

    def state_dict(self) -> dict:
        """What goes into the trainer's optim.pt: a marker only; the sharded state is save(dir)'s."""
        return {"zero_stage": self.stage, "sharded": True}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("sharded"):
            raise ValueError("optim.pt holds a plain (unsharded) optimizer state but this run uses ZeRO "
                             f"(parallel.zero_stage={self.stage}); resume with zero_stage=0, or start the "
                             f"optimizer afresh")
        # the state itself is read by load(dir), from the checkpoint's zero/ directory
