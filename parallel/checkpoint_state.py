"""What an engine holds of the one-process model's training state, as DCP boxes under GLOBAL names.

Keys (the names of the one-process STARFlow2.state_dict(), global shapes):
    model/<name>               weights and persistent buffers; a trainable parameter under ZeRO is
                               its fp32 master (so a bf16 run's checkpoint keeps full precision)
    optim/<name>/exp_avg       AdamW's moments of each trainable parameter, fp32 or the parameter's
    optim/<name>/exp_avg_sq    dtype (torch AdamW keeps them in it)
    optim/step                 AdamW's step count (an int)
Who writes what (parallel/dcp_boxes.py turns it into files):
    PlainEngine (one process)  everything, whole tensors
    ParallelEngine (TP x PP)   its stages' TP shards (one box each, offset along the split dimension);
                               DP replicas and TP-replicated entries offer the same boxes, DCP keeps one
    ZeroEngine ZeRO-1/2        trainable parameters: the flat fragments of its TP shards it owns
                               (`zero_checkpoint.local_fragments`, DeepSpeed's own maps), as boxes;
                               frozen ones and buffers: whole TP shards, like ParallelEngine
    ZeroEngine ZeRO-3          the same for every parameter (frozen ones from their partitions)
Loading builds the same description with destinations instead of sources, so any engine at any
layout reads any checkpoint. The last pipeline stage's copy of a tied embedding is saved as
`lm_head.weight` (weights and moments); a checkpoint without it (one process, where the two are
one tensor) feeds it from `embed_tokens.weight`.
Fused projections (qkv = [q; k; v], gate_up = [gate; up]) are stored fused, as the one-process
model names them; a TP shard of one is several boxes, one per part (parallel/fused.py). Checkpoints
from before the fusion (separate q_proj/k_proj/v_proj, gate_proj/up_proj keys) load too: each
part's boxes are read from its old key (`Placer`).

Not here: checkpoint directories and the collective protocol (parallel/checkpoint.py), other
formats (parallel/checkpoint_convert.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megaflow.model.layers import legacy_parts
from parallel.checkpoint_tp import shard_layout
from parallel.comm import group_rank, group_size
from parallel.dcp_boxes import Boxes, add_flat, checkpoint_keys, load_boxes, save_boxes
from parallel.fused import fused_layout, pieces

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "optim/step"
TIED = {"lm_head.weight": "embed_tokens.weight", "embed_tokens.weight": "lm_head.weight"}


def model_key(name: str) -> str:
    return f"model/{name}"


def optim_key(name: str, moment: str) -> str:
    return f"optim/{name}/{moment}"


def _moment_key(moment: str):
    return lambda name: optim_key(name, moment)


# ----- the engine's parts -------------------------------------------------------------------------
def is_zero(engine) -> bool:
    return hasattr(engine, "ds_config")


def _modules(engine) -> list:
    if getattr(engine, "stages", None) is not None:
        return [st.module for st in engine.stages]
    return [engine.module.model] if is_zero(engine) else [engine.model]


def entries(modules: list) -> dict:
    """{state-dict key: tensor (parameters as Parameter objects)} of the local modules."""
    out = {}
    for m in modules:
        for k, v in m.state_dict(keep_vars=True).items():
            if not k.endswith("_extra_state") and v is not None:
                out.setdefault(k, v)
    return out


def _trainable(engine, modules: list) -> dict:
    """{name: parameter} this engine's optimizer steps, each once."""
    if is_zero(engine):
        return {n: p for n, (p, _) in engine.named.items()}
    out, seen = {}, set()
    for m in modules:
        for n, p in m.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[n] = p
    return out


def _main_of(engine):
    """p -> the tensor the optimizer steps for model parameter p: its fp32 main weight under the
    engines' mixed precision (megaflow.optim.MainWeights: bf16 parameters), else p itself."""
    weights = getattr(engine, "weights", None)
    return weights.main_of if weights is not None else (lambda p: p)


def _place(name: str, local_shape, layout: dict) -> tuple:
    """(global size, origin) of the local tensor `name`: a TP shard sits at rank * local size
    along its split dimension; anything else is the whole tensor."""
    size, origin = list(local_shape), [0] * len(local_shape)
    if name in layout and group_size(layout[name][1]) > 1:
        dim, group = layout[name]
        size[dim] = local_shape[dim] * group_size(group)
        origin[dim] = local_shape[dim] * group_rank(group)
    return size, origin


class Placer:
    """Where the local tensors of `modules` go in the global (one-process) checkpoint.

    `where(name, local_shape)` -> [(checkpoint name, global size, origin, local rows or None)]: one
    piece for a plain tensor (its TP shard's place), one per part for a fused projection. With
    `keys` (a checkpoint's), a fused entry that the checkpoint has only under its parts' old names
    (written before the fusion) is addressed by those names instead."""

    def __init__(self, modules: list, keys: Optional[dict] = None):
        self.layout = {k: v for m in modules for k, v in shard_layout(m).items()}
        self.fused = {k: v for m in modules for k, v in fused_layout(m).items()}
        self.keys = keys

    def _legacy(self, name: str) -> bool:
        old = legacy_parts(name)
        return (self.keys is not None and old is not None and model_key(name) not in self.keys
                and all(model_key(o) in self.keys for o in old))

    def where(self, name: str, local_shape) -> list:
        size, origin = _place(name, local_shape, self.layout)
        parts = self.fused.get(name)
        dim, group = self.layout.get(name, (0, None))
        n, rank = group_size(group), group_rank(group)
        if parts is None or not local_shape or local_shape[0] != sum(p.rows for p in pieces(parts, n, rank)):
            return [(name, size, origin, None)]  # (an empty Transformer Engine bias placeholder too)
        rest, zeros = list(local_shape[1:]), [0] * (len(local_shape) - 1)
        own = pieces(parts, n, rank)
        if self._legacy(name):
            return [(old, [parts[p.part][0]] + rest, [p.offset] + zeros, (p.local, p.rows))
                    for p, old in zip(own, legacy_parts(name))]
        full = [sum(rows for rows, _ in parts)] + rest
        return [(name, full, [p.start] + zeros, (p.local, p.rows)) for p in own]

    def add(self, get_boxes, key_of, name: str, local_shape, t: torch.Tensor, start: Optional[int] = None) -> None:
        """Add `t` (the local tensor `name`, or with `start` its flat elements [start, start + numel))
        as boxes: `get_boxes(key, global size)` -> Boxes (None: skip), `key_of(name)` -> key."""
        row = math.prod(local_shape[1:]) if local_shape else 1
        for pname, size, origin, rows in self.where(name, local_shape):
            boxes = get_boxes(key_of(pname), size)
            if boxes is None:
                continue
            if rows is None:
                if start is None:
                    boxes.add(origin, t)
                else:
                    add_flat(boxes, local_shape, origin, start, t)
                continue
            shape = [rows[1]] + list(local_shape[1:])
            if start is None:
                boxes.add(origin, t.narrow(0, rows[0], rows[1]))
                continue
            lo, hi = rows[0] * row, (rows[0] + rows[1]) * row  # the piece's flat range in the local tensor
            a, b = max(start, lo), min(start + t.numel(), hi)
            if a < b:
                add_flat(boxes, shape, origin, a - lo, t[a - start:b - start])


def _zero3_piece(p, dp_rank: int) -> tuple:
    """(start, numel) of a ZeRO-3 parameter's local partition in its flattened (TP-local) tensor."""
    part = p.ds_tensor.ds_numel
    start = dp_rank * part
    return start, max(0, min(part, p.ds_numel - start))


def _local_shape(p) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _adamw_step(optimizer) -> int:
    for st in optimizer.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


# ----- save ---------------------------------------------------------------------------------------
@torch.no_grad()
def state_to_save(engine, topo=None) -> dict:
    """{key: Boxes or object}: this rank's pieces of the training state (see the file docstring)."""
    from parallel.zero_checkpoint import ensure_optimizer_state, local_fragments
    if getattr(engine, "sharded", None) is not None:  # parallel.dp_shard_optimizer: the other ranks' shards made whole
        engine.sharded.sync_state()
    modules = _modules(engine)
    place = Placer(modules)
    trainable = _trainable(engine, modules)
    zero = engine.stage if is_zero(engine) else 0
    dp_rank = topo.dp_rank if topo is not None else 0
    if zero:
        ensure_optimizer_state(engine)  # moments exist (zeros, step 0) before the first step too
    main_of = _main_of(engine)
    state = {}

    def boxes(key: str, size) -> Boxes:
        return state.setdefault(key, Boxes(size))

    for name, t in entries(modules).items():
        if zero and name in trainable:
            continue  # its fp32 master fragment, below
        if name in trainable:
            t = main_of(t)  # mixed precision: the fp32 main weight, so the checkpoint keeps full precision
        if zero == 3 and hasattr(t, "ds_tensor"):
            start, n = _zero3_piece(t, dp_rank)
            place.add(boxes, model_key, name, _local_shape(t), t.ds_tensor.detach().flatten()[:n], start)
        else:
            place.add(boxes, model_key, name, _local_shape(t), t.detach())
    if zero:
        for name, (start, n, pieces) in local_fragments(engine).items():
            shape = _local_shape(trainable[name])
            for key, piece in pieces.items():
                key_of = model_key if key == "fp32" else _moment_key(key)
                place.add(boxes, key_of, name, shape, piece.detach().flatten()[:n], start)
        from parallel.zero_checkpoint import _adam_step
        state[STEP] = _adam_step(engine)
        return state
    opt = engine.optimizer
    for name, p in trainable.items():
        p = main_of(p)
        st = opt.state.get(p, {})
        for k in MOMENTS:
            place.add(boxes, _moment_key(k), name, p.shape, st[k] if k in st else torch.zeros_like(p))
    state[STEP] = _adamw_step(opt)
    return state


def save_engine(engine, directory: Path, topo=None, group=None) -> dict:
    """Collective: every rank writes its pieces into `directory` (a DCP checkpoint); returns the
    checksums of the files this rank wrote (dcp_boxes.save_boxes)."""
    return save_boxes(state_to_save(engine, topo), directory, group)


# ----- load ---------------------------------------------------------------------------------------
class _Targets:
    """The load description under construction: {checkpoint key: Boxes of destinations}, the
    checkpoint's keys (with the tied-embedding alias), and the copies to run after the read.
    `add(key_of, name, shape, t, start)`: as Placer.add; returns False when the checkpoint lacks
    the entry (or, weights only, its kind)."""

    def __init__(self, keys: dict, place: Placer, weights_only: bool = False):
        self.keys, self.state, self.after, self.missing = keys, {}, [], []
        self.place, self.weights_only = place, weights_only

    def boxes(self, key: str, size) -> Optional[Boxes]:
        if self.weights_only and not key.startswith("model/"):
            return None
        if key not in self.keys:
            kind, name, *rest = key.split("/")
            alias = "/".join([kind, TIED[name], *rest]) if name in TIED else None
            if alias not in self.keys:
                if not self.weights_only:  # weights only (init_from): what the checkpoint lacks keeps its init
                    self.missing.append(key)
                return None
            key = alias
        return self.state.setdefault(key, Boxes(size))

    def add(self, key_of, name: str, shape, t: torch.Tensor, start: Optional[int] = None) -> bool:
        found = []

        def boxes(key: str, size):
            found.append(self.boxes(key, size))
            return found[-1]
        self.place.add(boxes, key_of, name, shape, t, start)
        return all(b is not None for b in found)


@torch.no_grad()
def load_targets(engine, topo, keys: dict, weights_only: bool = False) -> "_Targets":
    from parallel.zero_checkpoint import ensure_optimizer_state, local_fragments
    modules = _modules(engine)
    trainable = _trainable(engine, modules)
    zero = engine.stage if is_zero(engine) else 0
    dp_rank = topo.dp_rank if topo is not None else 0
    tg = _Targets(keys, Placer(modules, keys), weights_only)
    main_of = _main_of(engine)
    for name, t in entries(modules).items():
        if zero and name in trainable:
            continue
        shape = _local_shape(t)
        if name in trainable and main_of(t) is not t:  # mixed precision: into the fp32 main weight, then
            main = main_of(t)                          # the (bf16) parameter from it
            if tg.add(model_key, name, shape, main.data):
                tg.after.append(lambda _step, t=t, main=main: t.data.copy_(main))
        elif zero == 3 and hasattr(t, "ds_tensor"):
            start, n = _zero3_piece(t, dp_rank)
            tg.add(model_key, name, shape, t.ds_tensor.data.flatten()[:n], start)
        else:
            tg.add(model_key, name, shape, t.data)
    if zero:
        ensure_optimizer_state(engine)
        for name, (start, n, pieces) in local_fragments(engine).items():
            _zero_targets(tg, engine, trainable[name], name, start, n, pieces)
        return tg
    if weights_only:
        return tg
    bufs = {}
    trainable = {name: main_of(p) for name, p in trainable.items()}  # what AdamW steps, and keys its state by
    for name, p in trainable.items():
        bufs[name] = {k: torch.zeros_like(p) for k in MOMENTS}
        for k in MOMENTS:
            tg.add(_moment_key(k), name, p.shape, bufs[name][k])
    tg.after.append(lambda step: _set_adamw(engine.optimizer, trainable, bufs, step))
    return tg


def _zero_targets(tg: _Targets, engine, p, name: str, start: int, n: int, pieces: dict) -> None:
    """ZeRO-1/2: the master fragment from a whole fp32 copy of the TP shard (which also sets the
    module's (bf16) parameter), the moments straight into DeepSpeed's partitions. ZeRO-3: buffers
    of the fragment, handed to DeepSpeed's setters."""
    shape = _local_shape(p)
    if engine.stage < 3:
        whole = torch.empty(shape, dtype=torch.float32, device=pieces["fp32"].device)
        if not tg.add(model_key, name, shape, whole):
            return  # weights only, and the checkpoint lacks it: it keeps its init

        def copy(_step, p=p, whole=whole, piece=pieces["fp32"]):
            p.data.copy_(whole)
            piece.copy_(whole.flatten()[start:start + n])
        tg.after.append(copy)
        for k in MOMENTS:
            tg.add(_moment_key(k), name, shape, pieces[k].flatten()[:n], start)
        return
    bufs = {k: torch.zeros(p.ds_tensor.ds_numel, dtype=torch.float32, device=p.ds_tensor.device)
            for k in ("fp32",) + MOMENTS}
    if not tg.add(model_key, name, shape, bufs["fp32"][:n], start):
        return  # weights only, and the checkpoint lacks it: it keeps its init
    for k in MOMENTS:
        tg.add(_moment_key(k), name, shape, bufs[k][:n], start)

    def set_zero3(_step, p=p, bufs=bufs):
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
        safe_set_local_fp32_param(p, bufs["fp32"])
        for k in MOMENTS if not tg.weights_only else ():  # weights only: the fresh moments stay
            safe_set_local_optimizer_state(p, bufs[k], k)
        p.ds_tensor.data.copy_(bufs["fp32"])
    tg.after.append(set_zero3)


def _set_adamw(optimizer, trainable: dict, bufs: dict, step: int) -> None:
    """torch AdamW's state from the loaded moments, in place (no second copy): the step tensor
    where AdamW itself keeps it (on the parameter's device for the fused / capturable kernels)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in trainable.items():
        g = group_of.get(id(p))
        if g is None:
            continue
        if step == 0:
            optimizer.state.pop(p, None)
            continue
        on_device = g.get("fused") or g.get("capturable")
        optimizer.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32,
                                                   device=p.device if on_device else "cpu"), **bufs[name]}


def set_zero_step(engine, step: int) -> None:
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            st["step"].fill_(step) if torch.is_tensor(st["step"]) else st.__setitem__("step", step)


def _agree(error: Optional[str], group) -> Optional[str]:
    """The first rank's error (or None) on every rank: a check that fails on one rank must stop all
    of them before the collective read, or the others would wait for it forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    return next((e for e in errors if e), None)


@torch.no_grad()
def load_engine(engine, directory: Path, topo=None, group=None, weights_only: bool = False) -> int:
    """Collective: fill this rank's weights and optimizer state from the DCP checkpoint in
    `directory`, whatever layout wrote it; returns the optimizer step. `weights_only` (init_from):
    the weights the checkpoint has, the optimizer left fresh; returns 0."""
    keys = checkpoint_keys(directory)
    tg = load_targets(engine, topo, keys, weights_only)
    error = None
    if tg.missing:
        error = (f"it has no {tg.missing[0]!r} (and {len(tg.missing) - 1} more entries this model needs): it was "
                 f"written for another model or curriculum stage (model.stage)")
    else:
        for key, boxes in tg.state.items():
            if tuple(keys[key]) != tuple(boxes.size()):
                error = (f"{key!r} has shape {tuple(keys[key])} there but {tuple(boxes.size())} in this model: "
                         f"the checkpoint was made with another model config")
                break
    error = _agree(error, group)
    if error:
        raise ValueError(error)
    state = load_boxes({**tg.state, **({} if weights_only else {STEP: None})}, directory, group)
    step = 0 if weights_only else int(state[STEP])
    for fn in tg.after:
        fn(step)
    if is_zero(engine) and not weights_only:
        set_zero_step(engine, step)
    return step
