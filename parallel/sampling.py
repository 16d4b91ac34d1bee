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
Not under parallel.sequence_parallel (decoding feeds one token at a time): there the run skips its
grids and report and says so; tools/eval_quality.py judges a checkpoint afterwards.
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


def sampling_model(model: nn.Module, engine, topo) -> Optional[object]:
    """See the file docstring. None everywhere under sequence parallelism: decoding feeds one token
    at a time, which a sequence split cannot cut (the caller says so and skips sampling)."""
    if sequence_parallel(model) or (not is_zero3(engine) and topo.dp_rank != 0):
        return None
    if topo.pp > 1:
        from parallel.pipeline_generate import PipelinedModel
        return PipelinedModel(engine.stages, topo, engine.schedule.comm)
    return engine.module.model if is_zero3(engine) else model


def sampling_scope(engine):
    """ZeRO-3: the parameters held by modules that have children (STARFlow2.flow_start, the FAE's
    position table, ...), which their methods read outside a forward, gathered while it is open;
    a no-op for other engines."""
    if not is_zero3(engine):
        return contextlib.nullcontext()
    from parallel.zero import import_deepspeed
    module = engine.module.model
    deepspeed = import_deepspeed(next(module.parameters()).device.type)
    held = [p for m in module.modules() if next(m.children(), None) is not None for p in m.parameters(recurse=False)]
    return deepspeed.zero.GatheredParameters(held)
