"""Sample grids and the quality report on the model as training holds it: split by TP, PP or
ZeRO-3, never gathered whole onto one rank.

`sampling_model(model, engine, topo)` is what megaflow.model.generate's functions (and so
megaflow.quality) take as `model` on this rank, or None where this rank sits sampling out:
  - pp > 1 (any TP, ZeRO-1): parallel.pipeline_generate.PipelinedModel over this rank's stages,
    on the schedule's own links; each stage keeps its KV cache, the denoise step's gradient runs
    back through the stages (parallel/pipeline_denoise.py);
  - ZeRO-3: the partitioned model; DeepSpeed's module hooks gather each layer's weights for its
    forward (and backward, in the denoise step) and free them after, as in training;
    `sampling_scope` gathers the few parameters that methods read outside a forward;
  - otherwise (TP and/or DP, ZeRO-1/2): the tensor-parallel model itself (logits gathered over the
    vocabulary only to sample, parallel/tensor_parallel.py).
Who takes part: ZeRO-3, every rank (its gathers are collective over data parallelism); otherwise
the ranks of data-parallel replica 0 (the others get None). They run the same sampling loop with
the same seeds and draw the same samples, so every rank that takes part computes the same figures;
global rank 0 writes the files. The weights are the live ones (bf16 under bf16 parameters).
Under parallel.sequence_parallel, decoding feeds one token at a time, which a sequence split cannot
cut: `sampling_scope` turns the split off while sampling (the same tensor-parallel weights, with
plain TP's collectives: entry norms (or, under async TP, the column-parallel layers) copy instead of
gathering T, row layers all-reduce instead of reduce-scattering, `seq_split` keeps every token) and
restores it after. Layers of another backend (Transformer Engine) cannot be switched: there the run
skips its grids and report and says so; tools/eval_quality.py judges a checkpoint afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn as nn


def is_zero3(engine) -> bool:
    return getattr(engine, "stage", 0) == 3 and hasattr(engine, "ds_config")


def sequence_parallel(model: nn.Module) -> bool:
    """Whether the model's streams are split along the sequence (its `seq_split` hook holds a group)."""
    return getattr(getattr(model, "seq_split", None), "tp_group", None) is not None


def _sp_switches(module: nn.Module) -> Optional[list]:
    """(module, attribute, value without SP) for every sequence-parallel switch in `module`, or None
    if some layer's split cannot be switched off (not one of parallel/layers.py's)."""
    from parallel.layers import ColumnParallelLinear, ParallelRMSNorm, ReplicatedKVLinear, RowParallelLinear
    out = []
    if sequence_parallel(module):
        out.append((module, "seq_split", nn.Identity()))
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, ReplicatedKVLinear)) and m.input_comm == "gather":
            out.append((m, "input_comm", "copy"))  # async TP: the layer gathered T itself; plain TP copies
            continue
        if not getattr(m, "sequence_parallel", False):
            continue
        if isinstance(m, ParallelRMSNorm):  # 'gather' fed TP layers -> 'copy'; 'gather_replicated' -> plain
            out.append((m, "entry", {"gather": "copy", "gather_replicated": None}.get(m.entry, m.entry)))
        elif not isinstance(m, RowParallelLinear):
            return None
        out.append((m, "sequence_parallel", False))
    return out


@contextlib.contextmanager
def sequence_parallel_off(modules: list):
    """Plain tensor parallelism inside the block for `modules` (see the file docstring)."""
    saved = []
    try:
        for module in modules:
            for m, name, value in _sp_switches(module):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, value)
        yield
    finally:
        for m, name, value in reversed(saved):
            setattr(m, name, value)


def _modules(model: nn.Module, engine, topo) -> list:
    return [s.module for s in engine.stages] if topo.pp > 1 else [model]


def sampling_model(model: nn.Module, engine, topo) -> Optional[object]:
    """See the file docstring. None everywhere where sequence parallelism cannot be switched off
    (the caller says so and skips sampling)."""
    if any(_sp_switches(m) is None for m in _modules(model, engine, topo)):
        return None
    if not is_zero3(engine) and topo.dp_rank != 0:
        return None
    if topo.pp > 1:
        from parallel.pipeline_generate import PipelinedModel
        return PipelinedModel(engine.stages, topo, engine.schedule.comm)
    return engine.module.model if is_zero3(engine) else model


def sampling_scope(model: nn.Module, engine, topo):
    """Sequence parallelism switched off (see the file docstring); under ZeRO-3 the parameters held
    by modules that have children (STARFlow2.flow_start, the FAE's position table, ...), which their
    methods read outside a forward, gathered while it is open."""
    if not is_zero3(engine):
        return sequence_parallel_off(_modules(model, engine, topo))
    from parallel.zero import import_deepspeed
    module = engine.module.model
    deepspeed = import_deepspeed(next(module.parameters()).device.type)
    held = [p for m in module.modules() if next(m.children(), None) is not None for p in m.parameters(recurse=False)]
    return deepspeed.zero.GatheredParameters(held)
