"""Sharded (DCP) checkpoints with fused projections, on real gloo processes.

Contract:
- a TP2 engine saves its fused qkv / gate_up shards (each rank's q heads AND k/v heads, gate rows
  AND up rows) under the one-process names and global shapes: loaded into ONE process, the weights
  equal the TP model's gathered weights exactly, and the next step's loss equals the TP run's (1e-5),
  so the AdamW moments were placed right too;
- a sharded checkpoint in the layout written before the fusion (separate q_proj/k_proj/v_proj,
  gate_proj/up_proj keys for weights and moments) loads into a TP2 engine and into one process
  (`load_weights`): the next step's loss equals the one-process run that wrote it (1e-5);
- so does a one-process checkpoint from before the fusion (model.pt with the separate names, optim.pt
  numbering q, k, v separately) into a TP2 engine (`load_engine_from_one_process`) and into the
  one-process engine (`load_model_state` + `PlainEngine.load_state_dict`, what --resume runs);
- with fewer key/value heads than TP ranks (k/v rows of the fused shard replicated), the TP2
  engine's gradient norm (what clipping uses) equals one process's: replicated rows count once;
  a fresh per-rank init makes those rows equal across the ranks (the q rows stay independent draws).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megaflow.config import Config, TrainConfig
from megaflow.model.layers import legacy_parts
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import tiny_config

TOL, LR = 1e-5, 2e-3


def config(tp: int = 1, n_kv_heads: int = 2) -> Config:
    from data_pipeline.config import DataConfig
    m = tiny_config()
    return Config(model=dataclasses.replace(m, stage="all", vlm=dataclasses.replace(m.vlm, n_kv_heads=n_kv_heads)),
                  data=DataConfig(image_size=8, channels=1, patch_size=2),
                  train=TrainConfig(lr=LR, min_lr=LR, warmup=0, steps=4, grad_clip=1.0, weight_decay=0.1),
                  parallel=ParallelConfig(tp=tp))


def data():
    from tests.helpers import make_batch, make_noise
    batch = make_batch(config().model, 2, 48)
    return batch, make_noise(config().model, batch), torch.tensor([1.0, 0.0])


def step(engine) -> float:
    batch, noise, keep = data()
    return float(engine.train_step(batch, noise, keep, LR)["loss"])


def tp_engine(seed: int, n_kv_heads: int = 2, full=None):
    from parallel.runtime import build_engine, build_stages
    cfg, topo = config(tp=2, n_kv_heads=n_kv_heads), Topology(tp=2)
    model, stages, tied = build_stages(cfg.model, cfg.parallel, topo, "cpu", seed, full, 48)
    return build_engine(cfg, model, stages, tied, topo, None), topo, model


def one_process_engine(seed: int, n_kv_heads: int = 2):
    from megaflow.model.starflow import build_model
    from megaflow.train import PlainEngine
    cfg = config(n_kv_heads=n_kv_heads)
    return PlainEngine(build_model(cfg.model, seed=seed), cfg, None)


def _tp_ranks(rank, world, root):
    from parallel.checkpoint_state import load_engine, save_engine
    from parallel.checkpoint_tp import gather_full_state_dict
    engine, topo, model = tp_engine(seed=0)
    step(engine)
    save_engine(engine, Path(root) / "fused", topo)
    full = gather_full_state_dict(model)
    if rank == 0:
        torch.save(full, Path(root) / "gathered.pt")
    out = {"next": step(engine)}
    old, topo, _ = tp_engine(seed=5 + rank)  # other weights: all must come from the old-layout checkpoint
    assert load_engine(old, Path(root) / "legacy", topo) == 1
    out["legacy_next"] = step(old)
    from parallel.checkpoint_convert import load_engine_from_one_process
    old, topo, _ = tp_engine(seed=7 + rank)
    pt = torch.load(Path(root) / "legacy_pt", weights_only=False)
    assert load_engine_from_one_process(old, pt["model"], pt["optim"], config().model, config().train, topo) == 1
    out["legacy_pt_next"] = step(old)
    one_kv, _, model = tp_engine(0, n_kv_heads=1, full=torch.load(Path(root) / "one_kv.pt"))
    assert "ReplicatedKVLinear" in {type(m).__name__ for m in model.modules()}
    batch, noise, keep = data()
    out["one_kv_norm"] = float(one_kv.train_step(batch, noise, keep, LR)["grad_norm"])
    _, _, fresh = tp_engine(seed=0, n_kv_heads=1)  # initialised per rank: replicated k/v rows made equal
    qkv = fresh.units["0"].vlm_layers[0].self_attn.qkv.weight.detach()  # (16 q rows + 8 k + 8 v, 32)
    out["q_rows"], out["kv_rows"] = qkv[:16].clone().tolist(), qkv[16:].clone().tolist()
    return out


def legacy_one_process(engine) -> dict:
    """What the code before the fusion put in model.pt and optim.pt for the one-process `engine`
    (copies: the engine steps on)."""
    from megaflow.optim import group_names
    from parallel.fused import fused_layout
    parts = fused_layout(engine.model)
    model = {}
    for name, t in engine.model.state_dict().items():
        t = t.clone()
        model.update(zip(legacy_parts(name), t.split([r for r, _ in parts[name]])) if name in parts else {name: t})
    saved = engine.state_dict()["optimizer"]
    names = group_names(engine.model, [{"params": g} for g in engine._group_params()])
    state, groups, i = {}, [], 0
    for g, ns in zip(saved["param_groups"], names):
        ids = []
        for j, name in zip(g["params"], ns):
            entry = saved["state"][j]
            rows = [r for r, _ in parts[name]] if name in parts else [entry["exp_avg"].shape[0]]
            split = {k: entry[k].clone().split(rows) for k in ("exp_avg", "exp_avg_sq")}
            for x in range(len(rows)):
                state[i] = {"step": entry["step"].clone(), **{k: v[x] for k, v in split.items()}}
                ids.append(i)
                i += 1
        groups.append({**g, "params": ids})
    return {"model": model, "optim": {"optimizer": {"state": state, "param_groups": groups}}}


def legacy_checkpoint(engine, directory: Path) -> None:
    """What the code before the fusion saved for `engine`: its state under the separate names."""
    from parallel.checkpoint_state import state_to_save
    from parallel.dcp_boxes import Boxes, save_boxes
    from parallel.fused import fused_layout
    parts = fused_layout(engine.model)
    state = {}
    for key, value in state_to_save(engine).items():
        if not isinstance(value, Boxes):
            state[key] = value
            continue
        kind, name, *moment = key.split("/")
        if name not in parts:
            state[key] = value
            continue
        whole = torch.empty(value.size())
        for offsets, t in value.boxes:  # one box per part (q, k, v): the fused tensor is saved fused
            whole[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
        for old, t in zip(legacy_parts(name), whole.split([rows for rows, _ in parts[name]])):
            state["/".join([kind, old, *moment])] = Boxes(t.shape, [([0] * t.dim(), t.clone())])
    assert any("k_proj" in k for k in state) and not any(".qkv." in k or ".gate_up." in k for k in state)
    save_boxes(state, directory)


def test_fused_tp2_shards_and_old_layout_checkpoints_load(tmp_path):
    from parallel.checkpoint_convert import load_weights
    from parallel.checkpoint_state import load_engine
    from megaflow.train import load_model_state
    writer = one_process_engine(seed=3)
    step(writer)
    legacy_checkpoint(writer, tmp_path / "legacy")
    pt = legacy_one_process(writer)
    assert "units.0.vlm_layers.0.self_attn.v_proj.weight" in pt["model"]
    assert len(pt["optim"]["optimizer"]["state"]) > len(writer.optimizer.state_dict()["state"])
    torch.save(pt, tmp_path / "legacy_pt")
    want_legacy_next = step(writer)

    resumed = one_process_engine(seed=13)
    load_model_state(resumed.model, pt["model"], strict=True)
    resumed.load_state_dict(pt["optim"])
    assert abs(step(resumed) - want_legacy_next) < TOL

    one_kv = one_process_engine(seed=4, n_kv_heads=1)  # fewer k/v heads than ranks: k/v rows replicated
    torch.save(one_kv.model.state_dict(), tmp_path / "one_kv.pt")
    batch, noise, keep = data()
    want_norm = float(one_kv.train_step(batch, noise, keep, LR)["grad_norm"])

    ranks = run_distributed(_tp_ranks, 2, str(tmp_path))
    for r in ranks:
        assert abs(r["legacy_next"] - want_legacy_next) < TOL, (r["legacy_next"], want_legacy_next)
        assert abs(r["legacy_pt_next"] - want_legacy_next) < TOL, (r["legacy_pt_next"], want_legacy_next)
        assert abs(r["one_kv_norm"] - want_norm) < TOL * want_norm, (r["one_kv_norm"], want_norm)
    assert ranks[0]["kv_rows"] == ranks[1]["kv_rows"] and ranks[0]["q_rows"] != ranks[1]["q_rows"]

    one = one_process_engine(seed=9)
    assert load_engine(one, tmp_path / "fused") == 1
    sd = one.model.state_dict()
    for name, t in torch.load(tmp_path / "gathered.pt").items():
        assert torch.equal(sd[name], t), name
    assert abs(step(one) - ranks[0]["next"]) < TOL

    plain = one_process_engine(seed=11).model
    assert load_weights(plain, tmp_path / "legacy") == []
    legacy_model = one_process_engine(seed=3)  # the writer as it was when it saved
    step(legacy_model)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in legacy_model.model.state_dict().items())
