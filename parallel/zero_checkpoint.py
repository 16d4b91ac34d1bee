"""ZeRO-sharded optimizer state: DeepSpeed's per-parameter fragments, and the older per-rank format.

`local_fragments` (which flat piece of each parameter's fp32 master and moments this rank owns, from
DeepSpeed's own maps) and `ensure_optimizer_state` are what the sharded checkpoints of
`megaflow train` use (parallel/checkpoint_state.py: any layout on load). The rest of this file is
the older format, kept for `ZeroEngine.save` / `load`, the ZeRO unit tests and tools/reshard.py's
reading of old checkpoints:

Each rank writes `DIR/zero/pp{p}_tp{t}_dp{d}.pt`: for every trainable parameter it owns a piece of,
the parameter's full name (STARFlow2.state_dict() key), its TP layout (local shape, shard dim and
group rank/size, or none when replicated), and the piece [start, start + numel) of the flattened
local (TP-shard) tensor that this data-parallel rank holds, for the fp32 master weight and each AdamW
moment; plus AdamW's step. The pieces come from DeepSpeed's own fragment maps (ZeRO-1/2:
`param._hp_mapping`; ZeRO-3: the local partition), so the files do not depend on how DeepSpeed
buckets or pads, only on which elements each rank owns.

Reading back needs the same TP and PP degrees and any DP degree: a rank assembles the full local
tensors of its (tp, pp) coordinate from all `dp*` files and keeps its own fragment, so a run may
resume on a different number of data-parallel replicas. `read_full_state` assembles every tensor
of the unsplit model (DP pieces joined, TP shards concatenated, PP stages merged): what a tool that
changes TP or PP, or exports fp32 weights, starts from.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megaflow.optim import fuse_legacy_moments
from parallel.checkpoint_tp import shard_layout
from parallel.comm import group_rank, group_size
from parallel.fused import parts_layout, unshard_parts
from parallel.zero import master_partitions

FORMAT = "megaflow-zero-1"
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32",) + MOMENTS


def _file(d: Path, pp_rank: int, tp_rank: int, dp_rank: int) -> Path:
    return d / f"pp{pp_rank:02d}_tp{tp_rank:02d}_dp{dp_rank:03d}.pt"


def _inner_state(engine, flat: torch.Tensor) -> dict:
    return engine.optimizer.optimizer.state.get(flat, {})


def local_fragments(engine) -> dict:
    """{name: (start, numel, {key: this rank's piece})} of every trainable parameter, in the
    flattened local tensor's element numbering; numel 0 where this rank owns nothing."""
    opt, out = engine.optimizer, {}
    for name, (p, _) in engine.named.items():
        if engine.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
            part = p.ds_tensor.ds_numel
            start = engine.topo.dp_rank * part
            numel = max(0, min(part, p.ds_numel - start))
            pieces = {"fp32": safe_get_local_fp32_param(p)}
            pieces.update({k: safe_get_local_optimizer_state(p, k) for k in MOMENTS})
            out[name] = (start, numel, {k: v.flatten()[:numel] for k, v in pieces.items()})
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            out[name] = (0, 0, {k: torch.empty(0) for k in KEYS})
            continue
        flat = opt.single_partition_of_fp32_groups[mapping.param_group_index]
        hp = mapping.hp_fragment_address
        state = _inner_state(engine, flat)
        pieces = {"fp32": flat.narrow(0, hp.start, hp.numel)}
        pieces.update({k: state[k].narrow(0, hp.start, hp.numel) for k in MOMENTS})
        out[name] = (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel, pieces)
    return out


@torch.no_grad()
def ensure_optimizer_state(engine) -> None:
    """Create AdamW's (lazily made) state on master partitions that have none yet, by torch's own
    code: one inner step per partition with a zero gradient at lr 0, which changes no weight.
    The partition is put into its parameter group for that step (ZeRO-3 keeps the groups empty
    between steps and swaps its sub-group partitions in)."""
    zero, inner = engine.optimizer, engine.optimizer.optimizer
    masters = master_partitions(zero)
    group_of = getattr(zero, "sub_group_to_group_id", None) or {i: i for i in range(len(masters))}
    for i, flat in enumerate(masters):
        if "exp_avg" in inner.state.get(flat, {}):
            continue
        group = inner.param_groups[group_of[i]]
        params, lr = group["params"], group["lr"]
        others = [g["params"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["params"] = []
        group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
        inner.step()
        for g, ps in zip(inner.param_groups, others):
            g["params"] = ps
        group["lr"], flat.grad = lr, None


def _adam_step(engine) -> int:
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            return int(st["step"])
    return 0


@torch.no_grad()
def save_zero_state(engine, directory: Path) -> Path:
    """Write this rank's optimizer shard under `directory/zero/`; every rank calls it, and it returns
    when all shards are written."""
    topo, d = engine.topo, directory / "zero"
    d.mkdir(parents=True, exist_ok=True)
    params = {}
    for name, (start, numel, pieces) in local_fragments(engine).items():
        p, module = engine.named[name]
        layout = shard_layout(module).get(name)
        params[name] = {"shape": tuple(p.ds_shape if engine.stage == 3 else p.shape), "start": start, "numel": numel,
                        "tp_dim": layout[0] if layout else None, "tp_parts": parts_layout(module).get(name),
                        "tp_group_rank": group_rank(layout[1]) if layout else 0,
                        "tp_group_size": group_size(layout[1]) if layout else 1,
                        **{k: v.detach().float().cpu().clone() for k, v in pieces.items()}}
    blob = {"format": FORMAT, "zero_stage": engine.stage, "tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
            "tp_rank": topo.tp_rank, "pp_rank": topo.pp_rank, "dp_rank": topo.dp_rank,
            "step": _adam_step(engine), "params": params}
    path = _file(d, topo.pp_rank, topo.tp_rank, topo.dp_rank)
    torch.save(blob, path)
    if topo.rank == 0:
        (d / "layout.json").write_text(json.dumps({
            "format": FORMAT, "zero_stage": engine.stage, "tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
            "files": "pp{pp_rank}_tp{tp_rank}_dp{dp_rank}.pt: {'params': {name: {start, numel, shape, tp_dim, "
                     "tp_group_rank, tp_group_size, fp32, exp_avg, exp_avg_sq}}, 'step': AdamW step}"}, indent=1))
    if dist.is_initialized():
        dist.barrier()  # every rank's shard is on disk when any rank returns
    return path


def _assemble(files: list, name: str, numel: int) -> dict:
    """Full flattened local tensors {key: (numel,)} of one parameter from the pieces of all DP ranks."""
    full = {k: torch.zeros(numel) for k in KEYS}
    covered = torch.zeros(numel, dtype=torch.bool)
    for blob in files:
        e = blob["params"].get(name)
        if e is None or e["numel"] == 0:
            continue
        sl = slice(e["start"], e["start"] + e["numel"])
        for k in KEYS:
            full[k][sl] = e[k]
        covered[sl] = True
    if not bool(covered.all()):
        raise ValueError(f"ZeRO checkpoint: the pieces of {name!r} cover {int(covered.sum())} of {numel} elements; "
                         f"a dp*.pt file of this tensor/pipeline coordinate is missing")
    return full


def _read_coordinate(d: Path, pp_rank: int, tp_rank: int) -> list:
    files = sorted(d.glob(f"pp{pp_rank:02d}_tp{tp_rank:02d}_dp*.pt"))
    if not files:
        raise FileNotFoundError(f"no ZeRO optimizer shards for pp rank {pp_rank}, tp rank {tp_rank} in {d}; "
                                f"was the checkpoint written by a ZeroEngine?")
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


@torch.no_grad()
def load_zero_state(engine, directory: Path) -> None:
    """Restore this rank's fragment of the fp32 master weights, AdamW moments and step from
    `directory/zero/` (written with the same TP and PP degrees, any DP degree), and set the model's
    (possibly bf16) parameters from the master weights."""
    topo, d = engine.topo, directory / "zero"
    files = _read_coordinate(d, topo.pp_rank, topo.tp_rank)
    first = files[0]
    if (first["tp"], first["pp"]) != (topo.tp, topo.pp) or first["format"] != FORMAT:
        raise ValueError(f"ZeRO checkpoint in {d} has tp={first['tp']}, pp={first['pp']} ({first['format']}); this run "
                         f"has tp={topo.tp}, pp={topo.pp}: reshard it first (parallel.zero_checkpoint.read_full_state)")
    if len(files) != first["dp"]:
        raise ValueError(f"ZeRO checkpoint in {d}: {len(files)} files for pp rank {topo.pp_rank}, tp rank "
                         f"{topo.tp_rank} but it was written with dp={first['dp']}")
    ensure_optimizer_state(engine)
    mine = local_fragments(engine)
    for name, (p, _) in engine.named.items():
        if name not in first["params"]:
            raise KeyError(f"ZeRO checkpoint in {d} has no optimizer state for {name!r}: written for another model "
                           f"or curriculum stage (it has {len(first['params'])} parameters)")
        numel = p.ds_numel if engine.stage == 3 else p.numel()
        full = _assemble(files, name, numel)
        start, n, pieces = mine[name]
        for k, dst in pieces.items():
            dst.copy_(full[k][start:start + n])
        if engine.stage == 3:
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
            part = p.ds_tensor.ds_numel
            padded = {k: torch.zeros(part, dtype=torch.float32, device=p.ds_tensor.device) for k in KEYS}
            for k in KEYS:
                padded[k][:n] = full[k][start:start + n]
            safe_set_local_fp32_param(p, padded["fp32"])
            for k in MOMENTS:
                safe_set_local_optimizer_state(p, padded[k], k)
            p.ds_tensor.data.copy_(padded["fp32"])
        else:
            p.data.copy_(full["fp32"].view_as(p))
    step = first["step"]
    for st in engine.optimizer.optimizer.state.values():
        if "step" in st:
            st["step"].fill_(step) if torch.is_tensor(st["step"]) else st.__setitem__("step", step)


def read_full_state(directory) -> dict:
    """{name: {'fp32' | 'exp_avg' | 'exp_avg_sq': full tensor of the unsplit model}, 'step': int} from
    a ZeRO checkpoint of any TP / PP / DP layout (CPU, no process group): the reader of a reshard tool."""
    d = Path(directory) / "zero"
    blobs = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(d.glob("pp*_tp*_dp*.pt"))]
    if not blobs:
        raise FileNotFoundError(f"no ZeRO optimizer shards in {d}")
    coords = sorted({(b["pp_rank"], b["tp_rank"]) for b in blobs})
    shards = {}  # name -> {tp group rank: {key: local tensor}}
    meta = {}
    for pp_rank, tp_rank in coords:
        files = [b for b in blobs if (b["pp_rank"], b["tp_rank"]) == (pp_rank, tp_rank)]
        for name, e in files[0]["params"].items():
            shape = tuple(e["shape"])
            full = _assemble(files, name, int(torch.Size(shape).numel()))
            shards.setdefault(name, {})[e["tp_group_rank"]] = {k: v.view(shape) for k, v in full.items()}
            meta[name] = e
    out = {}
    for name, by_rank in shards.items():
        e = meta[name]
        if e["tp_dim"] is None:
            out[name] = by_rank[0]
        else:
            n = e["tp_group_size"]
            parts = [by_rank[r] for r in range(n)]
            out[name] = {k: torch.cat([pt[k] for pt in parts], dim=e["tp_dim"]) for k in KEYS}
            if e.get("tp_parts"):  # a fused projection: its shards are [q_r; k_r; v_r] (parallel/fused.py)
                out[name] = {k: unshard_parts(v, e["tp_parts"], n) for k, v in out[name].items()}
    return {**fuse_legacy_moments(out), "step": blobs[0]["step"]}  # (names from before the fusion: fused)
