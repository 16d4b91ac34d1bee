"""Checkpoints of multi-process runs: one directory, every rank writing only its own shards.

Protocol (`save_distributed`, collective: every rank calls it):
  1. global rank 0 creates the temporary directory `.tmp-step_XXXXXX-<its pid>`
     (megaflow.checkpoint.begin_checkpoint) and broadcasts its name: one shared name for all ranks;
  2. every rank writes its own files into it (`write(tmp)`);
  3. barrier; every rank's checksums of the files it wrote (hashed as DCP wrote them) are gathered
     onto rank 0, which writes meta.json (every file, sub-directories included: written last), renames
     the directory into place, updates `latest` and prunes (megaflow.checkpoint.commit_checkpoint);
     a broadcast of the final path releases the other ranks. A crash before the rename leaves the
     previous checkpoints intact.
All ranks must see one filesystem (as for any multi-node checkpoint).

Files:
  state/               torch.distributed.checkpoint (DCP): `__<rank>_0.distcp` per rank with that
                       rank's pieces of the weights, fp32 masters and AdamW moments, keyed by the
                       one-process model's names with global shapes and offsets, and `.metadata`
                       (written by rank 0 after every rank's data). What each engine writes:
                       parallel/checkpoint_state.py. Loads at ANY layout (DP, TP, flow_tp, PP,
                       virtual stages, ZeRO stage, or one process): each rank reads the overlap of
                       its own pieces with the saved ones. No rank ever holds the whole model.
  trainer.pt, config.json, tokenizer.*: rank 0 (step, loader position and history are identical on
                       every rank).
meta.json carries {"parallel": layout, "sharded": FORMAT}.

Async saves (`AsyncSave`): the pieces are copied to CPU memory while the step waits, written by a
background thread over a separate gloo group while training goes on, and committed (meta.json,
rename) at the next save or at the end of the run; until then the previous checkpoint is `latest`.

Old multi-process checkpoints (one gathered model.pt with zero/ or optim.ppPP_tpTT.pt) are refused
with the command that converts them (tools/reshard.py --out, then they load at any layout).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megaflow.checkpoint import CheckpointError, begin_checkpoint, commit_checkpoint, validate
from megaflow.model.layers import fuse_legacy
from megaflow.optim import fuse_legacy_moments

FORMAT = "megaflow-dcp-1"
STATE = "state"


def layout_of(topo, pcfg) -> dict:
    return {"world_size": topo.world_size, "tp": topo.tp, "flow_tp": topo.flow_tp, "pp": topo.pp, "dp": topo.dp,
            "zero_stage": pcfg.zero_stage, "virtual_stages": pcfg.virtual_stages}


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / STATE / ".metadata").is_file()


def check_format(ckpt: Path) -> None:
    """A CheckpointError for a multi-process checkpoint of the old (gathered model.pt) format."""
    if is_sharded(ckpt):
        return
    written_by = validate(ckpt).get("parallel")
    if written_by:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is in the old multi-process format (one gathered model.pt, "
                              f"optimizer files per layout; written with {written_by}); convert it once with "
                              f"`python tools/reshard.py {ckpt} --to-sharded NEW_DIR` and resume from NEW_DIR "
                              f"(train.out_dir=NEW_DIR --resume), which loads at any layout")


def save_distributed(root, step: int, write: Callable[[Path], Optional[dict]], keep_last: int, topo,
                     extra_meta: Optional[dict] = None) -> Path:
    """The collective form of megaflow.checkpoint.save_checkpoint (see the file docstring). `write`
    may return {path relative to the checkpoint: checksum} of files it hashed while writing them."""
    box = [str(begin_checkpoint(root, step)) if topo.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    sums = write(tmp)
    return _commit(root, tmp, step, keep_last, topo, extra_meta, sums)


def _commit(root, tmp: Path, step: int, keep_last: int, topo, extra_meta, sums: Optional[dict] = None) -> Path:
    """Every rank's checksums gathered onto rank 0 (each rank hashed its own files as it wrote them,
    in parallel), which hashes only the rest, writes meta.json and renames."""
    dist.barrier()
    every = [None] * topo.world_size if topo.rank == 0 else None
    dist.gather_object(sums or {}, every, dst=0)
    if topo.rank == 0:
        known = {k: v for part in every for k, v in part.items()}
        box = [str(commit_checkpoint(root, tmp, step, keep_last, extra_meta, known))]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def save_engine_state(engine, directory: Path, topo, group=None) -> dict:
    """Every rank calls it inside `write`: its pieces into directory/state (DCP). Returns
    {"state/<file>": checksum} of the files this rank wrote, for meta.json."""
    from parallel.checkpoint_state import save_engine
    return {f"{STATE}/{k}": v for k, v in save_engine(engine, Path(directory) / STATE, topo, group).items()}


def load_engine_state(engine, ckpt: Path, topo=None, weights_only: bool = False) -> int:
    """Collective (all ranks, or one process with topo None): weights and optimizer state of this
    rank from a sharded checkpoint of any layout. Returns the optimizer step. `weights_only`
    (train.init_from): the weights it has, nothing else."""
    from parallel.checkpoint_state import load_engine
    check_format(ckpt)
    if not is_sharded(ckpt):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no {STATE}/ (sharded) state")
    try:
        return load_engine(engine, Path(ckpt) / STATE, topo, weights_only=weights_only)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {e}") from e


def read_sharded(ckpt: Path, weights_only: bool = False) -> tuple:
    """(weights {name: whole tensor}, optimizer {name: {'exp_avg', 'exp_avg_sq'}, 'step': int}) of
    a sharded checkpoint, in this process: for offline tools (export, conversion, inspection),
    which hold the whole model by definition; training never calls it. Names are the fused model's
    also for a checkpoint written before the fusion (megaflow.model.layers.fuse_legacy)."""
    from parallel.dcp_boxes import checkpoint_keys, read_full
    d = Path(ckpt) / STATE
    keys = list(checkpoint_keys(d))
    wanted = [k for k in keys if k.startswith("model/") or (not weights_only and k.startswith("optim/"))]
    full = read_full(d, wanted)
    weights = fuse_legacy({k[len("model/"):]: v for k, v in full.items() if k.startswith("model/")})
    optim: dict = {}
    for k, v in full.items():
        if k.startswith("optim/") and k != "optim/step":
            name, moment = k[len("optim/"):].rsplit("/", 1)
            optim.setdefault(name, {})[moment] = v
    return weights, {**fuse_legacy_moments(optim), "step": int(full.get("optim/step") or 0)}


class AsyncSave:
    """dcp's save in a background thread, as the file docstring says. `start` is collective; call
    `finish` (collective) before the next `start` and before the run ends."""

    def __init__(self, topo):
        self.topo, self.pending, self.group = topo, None, None
        if topo is not None and dist.is_initialized():
            self.group = dist.new_group(backend="gloo")  # the background thread's own collectives

    def start(self, root, step: int, engine, write_rest: Callable[[Path], None], keep_last: int,
              extra_meta: Optional[dict] = None) -> None:
        from parallel.checkpoint_state import state_to_save
        from parallel.dcp_boxes import save_boxes, staged
        self.finish()
        box = [str(begin_checkpoint(root, step)) if self.topo.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
        write_rest(tmp)
        state = staged(state_to_save(engine, self.topo))  # CPU copies: training may change the originals
        err, sums = [], {}

        def run():
            try:
                sums.update({f"{STATE}/{k}": v for k, v in save_boxes(state, tmp / STATE, self.group).items()})
            except BaseException as e:  # re-raised by finish, on the training thread
                err.append(e)
        thread = threading.Thread(target=run, name="megaflow-async-save", daemon=True)
        thread.start()
        self.pending = (root, tmp, step, keep_last, extra_meta, thread, err, sums)

    def finish(self) -> Optional[Path]:
        if self.pending is None:
            return None
        root, tmp, step, keep_last, extra_meta, thread, err, sums = self.pending
        self.pending = None
        thread.join()
        if err:
            raise err[0]
        return _commit(root, tmp, step, keep_last, self.topo, extra_meta, sums)


def full_model_state(model, engine, topo) -> Optional[dict]:
    """The single-process state dict on global rank 0 (None elsewhere), gathered over DP (ZeRO),
    TP and PP: the old whole-model gather, kept only as tools/bench_checkpoint.py's baseline; no
    checkpoint, evaluation, sample grid or report uses it."""
    from parallel.checkpoint_tp import gather_full
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
