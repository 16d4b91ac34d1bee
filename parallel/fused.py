"""Tensor parallelism of fused projections: tensors made of parts stacked along dim 0.

The model's fused QKV weight is [q; k; v] and its gate/up weight [gate; up] (megaflow/model/layers.py).
A column-parallel rank must hold ITS q heads and ITS k/v heads, not a contiguous chunk of the fused
matrix: its local tensor is [q_r; k_r; v_r], each part split on its own. A part may also be whole on
every rank (`sharded=False`: the key/value heads when there are fewer of them than ranks).

A layer declares its parts in `tp_parts` ({param name: tuple of (global rows, sharded)}) next to
`tp_shards` (which says dim 0 for those parameters). This file turns that into the pieces a rank
holds: to slice a full tensor (load), to put gathered shards back in order (gather), and to place
each piece in the global one-process tensor (DCP checkpoints, parallel/checkpoint_state.py).

Not here: the layers (parallel/layers.py), which layer goes where (parallel/tensor_parallel.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn


class Piece(NamedTuple):
    """Rows [local, local + rows) of a rank's tensor are rows [start, start + rows) of the global
    tensor, which are rows [offset, offset + rows) of part `part`."""
    local: int
    rows: int
    start: int
    part: int
    offset: int


def pieces(parts: tuple, n: int, rank: int) -> list:
    """The Pieces of rank `rank` of `n` for a tensor of `parts` ((global rows, sharded), ...)."""
    out, local, start = [], 0, 0
    for i, (rows, sharded) in enumerate(parts):
        if sharded and rows % n:
            raise ValueError(f"part {i} of a fused tensor has {rows} rows, not divisible by {n} ranks")
        mine = rows // n if sharded else rows
        offset = rank * mine if sharded else 0
        out.append(Piece(local, mine, start + offset, i, offset))
        local, start = local + mine, start + rows
    return out


def all_sharded(rows: tuple) -> tuple:
    """`parts` of a fused tensor whose every part is split over the ranks."""
    return tuple((r, True) for r in rows)


def shard_parts(full: torch.Tensor, parts: tuple, n: int, rank: int) -> torch.Tensor:
    """This rank's local tensor out of the full one (rows of each part, concatenated)."""
    return torch.cat([full.narrow(0, p.start, p.rows) for p in pieces(parts, n, rank)])


def unshard_parts(gathered: torch.Tensor, parts: tuple, n: int) -> torch.Tensor:
    """The full tensor from every rank's local tensor concatenated along dim 0 in rank order (what an
    all-gather along dim 0 returns); a replicated part is taken from rank 0."""
    local = gathered.shape[0] // n
    out = []
    for i, (rows, sharded) in enumerate(parts):
        ranks = range(n) if sharded else range(1)
        for r in ranks:
            p = pieces(parts, n, r)[i]
            out.append(gathered.narrow(0, r * local + p.local, p.rows))
    return torch.cat(out)


def _key(*names) -> str:
    return ".".join(n for n in names if n)


def parts_layout(model: nn.Module) -> dict:
    """{state-dict key: parts} of every fused entry of a tensor-parallel model (see `tp_parts`)."""
    layout = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, parts in getattr(mod, "tp_parts", {}).items():
            if getattr(mod, pname, None) is not None:
                layout[_key(mod_name, pname)] = parts
    return layout


def fused_layout(model: nn.Module) -> dict:
    """{state-dict key: parts} of EVERY fused entry: a tensor-parallel layer's `tp_parts`, and the
    unsplit fused projections of the model (`fused_rows()` of its attention and MLP modules) whole."""
    layout = parts_layout(model)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for child, rows in (mod.fused_rows() if hasattr(mod, "fused_rows") else {}).items():
            for pname in ("weight", "bias"):
                key = _key(mod_name, child, pname)
                if key not in layout and getattr(getattr(mod, child), pname, None) is not None:
                    layout[key] = all_sharded(rows)
    return layout
