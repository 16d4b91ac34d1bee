"""Checkpoint formats other than a multi-process run's own, read by the same description of an
engine's pieces (parallel/checkpoint_state.py):

  load_engine_from_one_process   a one-process checkpoint (model.pt + the PlainEngine's optim.pt)
                                 into any engine at any layout: each rank slices its pieces out of
                                 the whole tensors (the one-process model fits one process anyway)
  load_weights                   a sharded checkpoint's weights into a one-process model, whole,
                                 in this process only (inference, init_from)
"""
from __future__ import annotations

from pathlib import Path

import torch

from megaflow.model.layers import fuse_legacy
from parallel.checkpoint_state import (MOMENTS, Placer, entries, is_zero, load_targets, model_key, optim_key,
                                       set_zero_step)
from parallel.dcp_boxes import Boxes, checkpoint_keys, load_boxes


@torch.no_grad()
def load_engine_from_one_process(engine, model_pt: dict, optim_pt: dict, model_cfg, train_cfg, topo=None) -> int:
    """A one-process checkpoint (model.pt's state dict, optim.pt's PlainEngine state) into any
    engine at any layout: each rank slices its pieces out of the whole tensors. AdamW's entries are
    numbered in the order megaflow.optim.build_optimizer gives the one-process model (rebuilt here
    on the meta device), which names them. Returns the step."""
    from megaflow.model.starflow import STARFlow2, apply_stage
    from megaflow.optim import fuse_legacy_optimizer, group_names, param_groups
    with torch.device("meta"):
        meta = STARFlow2(model_cfg)
    apply_stage(meta, model_cfg.stage)
    names = group_names(meta, param_groups(meta, train_cfg.weight_decay))
    order = [n for group in names for n in group]
    saved = fuse_legacy_optimizer(optim_pt["optimizer"], names)["state"]  # (from before the fused projections too)
    full = {model_key(k): v for k, v in fuse_legacy(dict(model_pt)).items()}
    step = 0
    for i, name in enumerate(order):
        if i in saved:
            full.update({optim_key(name, k): saved[i][k] for k in MOMENTS})
            step = int(saved[i]["step"])
    keys = {k: v.shape for k, v in full.items()}
    tg = load_targets(engine, topo, keys)
    if tg.missing:
        raise ValueError(f"it has no {tg.missing[0]!r} ({len(tg.missing)} entries this model needs): written for "
                         f"another model or curriculum stage")
    for key, boxes in tg.state.items():
        src = full[key]
        if tuple(src.shape) != tuple(boxes.size()):
            raise ValueError(f"{key!r} has shape {tuple(src.shape)} there but {tuple(boxes.size())} in this model")
        for offsets, dst in boxes.boxes:
            dst.copy_(src[tuple(slice(o, o + n) for o, n in zip(offsets, dst.shape))])
    for fn in tg.after:
        fn(step)
    if is_zero(engine):
        set_zero_step(engine, step)
    return step


@torch.no_grad()
def load_weights(model, directory: Path, strict: bool = True) -> list:
    """One process: the weights of a DCP checkpoint into `model` (a plain STARFlow2), whole tensors
    (fused projections from their old separate keys too: Placer); returns the keys the checkpoint
    lacks (an error when `strict`)."""
    keys = checkpoint_keys(directory)
    place = Placer([model], keys)
    state, missing = {}, []
    for name, t in entries([model]).items():
        found = []

        def boxes(key: str, size):
            if key not in keys:
                found.append(False)
                return None
            if tuple(keys[key]) != tuple(size):
                raise ValueError(f"{key[len('model/'):]!r} has shape {tuple(keys[key])} in the checkpoint but "
                                 f"{tuple(size)} in this model: the checkpoint was made with another model config")
            return state.setdefault(key, Boxes(size))
        place.add(boxes, model_key, name, t.shape, t.data)
        if found:
            missing.append(name)
    if strict and missing:
        raise ValueError(f"the checkpoint has no weights for {missing[:3]} ({len(missing)} entries): it was written "
                         f"for another model")
    load_boxes(state, directory, local=True)
    return missing
