"""Held-out loss terms of one batch on a model split by TP / PP / ZeRO, without gathering it.

`eval_terms(engine, batch, noise, dtype)` -> ({'text_sum', 'flow_sum'}, {'text', 'dims'}) of the
batch, the same numbers one process's `model.terms` / `model.loss_counts` give (up to rounding), on
every rank. How, per engine:
  - ParallelEngine (any TP x PP, pp = 1 included) and ZeroEngine with pp > 1: a forward-only pass
    of the pipeline schedule (`PipelineSchedule.step(..., forward_only=True)`); TP layers reduce
    inside the forward, the last stage's figures are broadcast over the pipeline;
  - ZeroEngine with pp = 1 (ZeRO-1/2/3): DeepSpeed's engine forward on GlobalLoss, which fetches
    ZeRO-3's partitioned parameters layer by layer, as in training.
Every data-parallel replica evaluates the same batch (ZeRO-3 and the pipeline schedule run
collectives over the DP group, so all replicas must take part); the figures are identical on every
rank. Called by megaflow.train.evaluate. Not here: loaders, noise, the figures' final form.
"""
from __future__ import annotations

import torch


def _modules(engine) -> list:
    if getattr(engine, "stages", None) is not None:
        return [st.module for st in engine.stages]
    return [engine.module.model]


@torch.no_grad()
def eval_terms(engine, batch: dict, noise, dtype) -> tuple:
    modules = _modules(engine)
    for m in modules:
        m.eval()
    counts = {k: int(v) for k, v in modules[0].loss_counts(batch).items() if k in ("text", "dims")}
    device = batch["tokens"].device
    zero_dtype = getattr(engine, "dtype", None) if hasattr(engine, "ds_config") else None
    if zero_dtype is not None:  # bf16 ZeRO parameters: floating inputs in their dtype, as in train_step
        batch = {k: v.to(zero_dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        noise = noise.to(zero_dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        schedule = getattr(engine, "schedule", None)
        if schedule is not None:
            _, metrics = schedule.step(batch, noise, None, forward_only=True)
            terms = {"flow_sum": metrics.get("flow_nll", 0.0) * counts["dims"],
                     "text_sum": metrics.get("text_loss", 0.0) * counts["text"]}
        else:
            _, raw = engine.engine(batch, noise, None, modules[0].loss_counts(batch))
            terms = {k: float(raw[k]) for k in ("flow_sum", "text_sum") if k in raw}
    return terms, counts
