"""Full (unsharded) state dicts in and out of a tensor-parallel model.

A tensor-parallel layer names its sharded parameters in `tp_shards` ({name: dim}) next to its
`tp_group`; everything else is replicated. So a full state dict (the one a single-process
STARFlow2 saves, with the same keys) loads by slicing, and gathers back by all-gathering along the
same dims. Fused projections (`tp_parts`, parallel/fused.py) are sliced and gathered part by
part. Works for both backends (Transformer Engine's `_extra_state` entries are skipped).

Not here: checkpoint files, pipeline or data-parallel layout (parallel/checkpoint.py owns those).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from parallel.comm import all_gather, group_rank, group_size
from parallel.fused import parts_layout, shard_parts, unshard_parts


def shard_layout(model: nn.Module) -> dict:
    """{state-dict key: (dim, group)} of every sharded entry; keys not listed are replicated."""
    layout = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, dim in getattr(mod, "tp_shards", {}).items():
            if getattr(mod, pname, None) is not None:
                layout[f"{mod_name}.{pname}" if mod_name else pname] = (dim, mod.tp_group)
    return layout


def _skip(key: str) -> bool:
    return key.endswith("_extra_state")


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict, strict: bool = True) -> None:
    """Copy this rank's shard of every entry of the full state dict `full` into `model` (a
    tensor-parallel model, materialised). Shapes are checked against the full sizes."""
    layout, fused = shard_layout(model), parts_layout(model)
    local = {k: v for k, v in model.state_dict().items() if not _skip(k)}
    missing = [k for k in local if k not in full]
    unexpected = [k for k in full if k not in local and not _skip(k)]
    if strict and (missing or unexpected):
        raise KeyError(f"full state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, dst in local.items():
        if key not in full:
            continue
        src = full[key]
        if key in layout:
            dim, group = layout[key]
            n = group_size(group)
            if key in fused:
                if src.shape[0] != sum(rows for rows, _ in fused[key]):
                    raise ValueError(f"{key}: full size {tuple(src.shape)} is not the fused parts {fused[key]}")
                src = shard_parts(src, fused[key], n, group_rank(group))
            elif src.shape[dim] != dst.shape[dim] * n:
                raise ValueError(f"{key}: full size {tuple(src.shape)} does not split into {n} shards of {tuple(dst.shape)}")
            else:
                src = src.chunk(n, dim=dim)[group_rank(group)]
        if src.shape != dst.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(src.shape)} != model shape {tuple(dst.shape)}")
        dst.copy_(src)


@torch.no_grad()
def gather_full(model: nn.Module, tensors: dict) -> dict:
    """All-gather the sharded entries of `tensors` ({state-dict key: local tensor}, e.g. weights or
    gradients) into full tensors; replicated entries are returned as they are. Collective: every
    rank of every TP group must call it, with the same keys."""
    layout, fused = shard_layout(model), parts_layout(model)
    out = {}
    for key, t in tensors.items():
        if _skip(key) or t is None:
            continue
        if key in layout and group_size(layout[key][1]) > 1:
            dim, group = layout[key]
            t = all_gather(t, group, dim)
            if key in fused:
                t = unshard_parts(t, fused[key], group_size(group))
        out[key] = t
    return out


def gather_full_state_dict(model: nn.Module) -> dict:
    """The single-process state dict of a tensor-parallel model, on every rank (same keys as
    STARFlow2.state_dict())."""
    return gather_full(model, model.state_dict())


def gather_full_grads(model: nn.Module) -> dict:
    """{parameter name: full gradient} of the parameters that have one."""
    return gather_full(model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
