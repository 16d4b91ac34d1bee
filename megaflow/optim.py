"""Optimizer and learning-rate schedule: AdamW (fused where the device supports it) with decay only
on matrices, and a warm-up + cosine schedule that is a pure function of the step, so it is the one
source of truth for every engine (plain, pipelined, DeepSpeed) and resumes without state."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Trainable parameters split into decayed (matrices) and not decayed (norms, biases,
    embeddings, the flow start token).

    Decay follows a parameter's role, not the name one process happens to see: an LM head tied to
    the token embedding is the embedding (no decay), also on a pipeline's last stage, where the tied
    copy is a separate tensor named `lm_head.weight` (parallel/pipeline.py TiedEmbeddings). Any
    wrapper (DeepSpeed's, a ModuleList of stages) is fine: roles come from the STARFlow2 (views) inside."""
    tied_heads = {id(m.lm_head.weight) for m in model.modules()
                  if getattr(m, "lm_head", None) is not None and _ties_embeddings(m)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name or id(p) in tied_heads:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _ties_embeddings(module) -> bool:
    vlm = getattr(getattr(module, "cfg", None), "vlm", None)
    return bool(vlm is not None and getattr(vlm, "tie_embeddings", False))


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    groups = param_groups(model, tcfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters in this curriculum stage; check model.stage")
    device = next(p for g in groups for p in g["params"]).device
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    # The fused kernel is exact AdamW; on CPU the foreach path is the tested one.
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
