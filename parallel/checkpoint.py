"""Checkpoints of multi-process runs: one directory, written by every rank, committed by one.

Protocol (`save_distributed`, collective: every rank calls it):
  1. global rank 0 creates the temporary directory `.tmp-step_XXXXXX-<its pid>`
     (megaflow.checkpoint.begin_checkpoint) and broadcasts its name: one shared name for all ranks;
  2. every rank writes its own files into it (`write(tmp)`);
  3. barrier; rank 0 writes meta.json (every file, sub-directories included, with its size: written
     last), renames the directory into place, updates `latest` and prunes; a broadcast of the final
     path releases the other ranks. A crash before the rename leaves the previous checkpoints intact.
All ranks must see one filesystem (as for any multi-node checkpoint).

Files. The model is written ONCE, in the single-process format, whatever the layout:
  model.pt             full unsharded state dict (fp32 master values under ZeRO), gathered over TP
                       (all-gather of shards, parallel/checkpoint_tp.py) on the ranks of DP replica 0,
                       then over PP (each stage's dict to the pipeline's first rank, gather_object) and
                       written by global rank 0. It loads in one process (megaflow.inference) and
                       into any TP / PP layout (sliced on load). Cost: rank 0 holds the full model in
                       CPU memory while saving (per-stage files would avoid that; not done).
  optim.ppPP_tpTT.pt   ParallelEngine's AdamW state of one TP x PP coordinate, written by its DP rank
                       0 (DP replicas hold identical states). Resume: same tp, pp, flow_tp; any dp.
  zero/                ZeroEngine's sharded optimizer state (parallel/zero_checkpoint.py). Resume:
                       same tp, pp; any dp.
  optim.pt             {'engine': 'parallel' | 'zero', 'layout': ...} (rank 0), so a one-process
                       resume says what to do instead of misreading it.
  trainer.pt, config.json, tokenizer.*: rank 0 (step, loader position and history are identical on
                       every rank).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megaflow.checkpoint import CheckpointError, begin_checkpoint, commit_checkpoint, load_file
from parallel.checkpoint_tp import gather_full


def layout_of(topo, pcfg) -> dict:
    return {"world_size": topo.world_size, "tp": topo.tp, "flow_tp": topo.flow_tp, "pp": topo.pp, "dp": topo.dp,
            "zero_stage": pcfg.zero_stage}


def save_distributed(root, step: int, write: Callable[[Path], None], keep_last: int, topo,
                     extra_meta: Optional[dict] = None) -> Path:
    """The collective form of megaflow.checkpoint.save_checkpoint (see the file docstring)."""
    box = [str(begin_checkpoint(root, step)) if topo.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    write(tmp)
    dist.barrier()
    box = [str(commit_checkpoint(root, tmp, step, keep_last, extra_meta)) if topo.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


@torch.no_grad()
def full_model_state(model, engine, topo) -> Optional[dict]:
    """The single-process state dict on global rank 0 (None elsewhere). Collective: every rank
    calls it (ZeRO's fp32 masters are gathered over DP first). `model` is the meta-built model
    the stages were cut from: its TP layout names the sharded entries."""
    local = engine.model_state_dict()
    if topo.dp_rank != 0:
        return None
    full = {k: v.detach().cpu() for k, v in gather_full(model, local).items()}  # over this TP group
    if topo.pp > 1 and topo.tp_rank == 0:
        parts = [None] * topo.pp if topo.pp_rank == 0 else None
        dist.gather_object(full, parts, dst=topo.pp_ranks[0], group=topo.pp_group)
        if topo.pp_rank == 0:
            full = {k: v for part in parts for k, v in part.items()}
    return full if topo.rank == 0 else None


def optimizer_file(topo) -> str:
    return f"optim.pp{topo.pp_rank:02d}_tp{topo.tp_rank:02d}.pt"


def save_optimizer(engine, directory: Path, topo, layout: dict) -> None:
    """Every rank calls it inside `write`."""
    if hasattr(engine, "save"):  # ZeroEngine: every rank writes its shard under zero/
        engine.save(directory)
        kind = "zero"
    else:
        if topo.dp_rank == 0:
            torch.save(engine.state_dict(), directory / optimizer_file(topo))
        kind = "parallel"
    if topo.rank == 0:
        torch.save({"engine": kind, "layout": layout}, directory / "optim.pt")


def load_optimizer(engine, ckpt: Path, topo, layout: dict) -> None:
    saved = load_file(ckpt, "optim.pt")
    kind = "zero" if hasattr(engine, "save") else "parallel"
    if saved.get("engine") != kind:
        was = saved.get("layout") or "one process"
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds the optimizer state of {was} ({saved.get('engine', 'plain')} "
                              f"engine); this run is {layout} ({kind}): resume with the checkpoint's layout, or start "
                              f"from its weights only with --set train.init_from={ckpt}")
    if kind == "zero":
        engine.load_state_dict({"sharded": True})
        engine.load(ckpt)
        return
    if not (ckpt / optimizer_file(topo)).is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no {optimizer_file(topo)}: it was written with "
                              f"{saved['layout']}, this run is {layout}; resume with the same parallel.tp and pp")
    try:
        engine.load_state_dict(load_file(ckpt, optimizer_file(topo)))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {e}") from e
