"""DeepSpeed ZeRO (parallel/zero.py) against one process without ZeRO, on real gloo processes.

Contract, for DP=2 with ZeRO-1, ZeRO-2 and ZeRO-3 (PP=1, fp32; two micro-batches per step at
ZeRO-2/3), the model loaded from the single-process model's state dict:
- the loss of each of 5 steps (LR from lr_at with warm-up, clipping at cfg.train.grad_clip active:
  the norm is above it) equals the single-process PlainEngine's on the same global batch (1e-5),
  and so does the reported gradient norm (1e-5 relative);
- each rank holds within 10% of 1/DP of the optimizer state (fp32 master + AdamW moments), and the
  DP ranks together hold 12 bytes per trainable parameter (+ < 1% padding): sharded, not replicated;
- save after step 3 -> a fresh engine (initial weights) loads -> steps 4, 5 give bit-identical losses;
- the checkpoint reloads on DP=1 (one process: resharding over DP) and continues within 1e-5;
- `read_full_state` of the checkpoint gives the single-process model's fp32 weights and AdamW moments
  after 3 steps, under the same names.
bf16 (ZeRO-1, DP=2): parameters are bf16, the master weights fp32, and the loss stays within 1%
(bf16's rounding) of the fp32 reference; save -> load -> continue is bit-identical in bf16 too.
`build_ds_config` maps our config (no DeepSpeed optimizer or scheduler) and refuses ZeRO-2/3 with PP.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from data_pipeline.config import DataConfig
from megaflow.config import Config, TrainConfig
from megaflow.model.starflow import STARFlow2, apply_stage, build_model
from megaflow.optim import lr_at
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config

STEPS, SAVE_AT, ROWS, TOL, BF16_RTOL = 5, 3, 4, 1e-5, 1e-2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops():
    """Compile DeepSpeed's CPU communication op once, here, before any rank imports DeepSpeed (the
    spawned ranks inherit the environment and find it in .torch_extensions)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    from parallel.zero import import_deepspeed
    import_deepspeed("cpu").get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


def zero_config(stage: int, tp: int = 1, pp: int = 1, micro_batches: int = 1, flow_tp: int = 0) -> Config:
    return Config(model=dataclasses.replace(tiny_config(), stage="all"),
                  data=DataConfig(image_size=8, channels=1, patch_size=2),
                  train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup=2, steps=STEPS, grad_clip=1.0, weight_decay=0.1),
                  parallel=ParallelConfig(tp=tp, flow_tp=flow_tp, pp=pp, micro_batches=micro_batches,
                                          zero_stage=stage))


def data(cfg: Config):
    batch = make_batch(cfg.model, ROWS, 48)
    return batch, make_noise(cfg.model, batch), torch.tensor([1.0, 0.0, 1.0, 1.0])  # row 1 drops the condition


def lr(cfg: Config, step: int) -> float:
    t = cfg.train
    return lr_at(step, t.lr, t.min_lr, t.warmup, t.steps)


def reference(cfg: Config):
    """The run without ZeRO: one process, PlainEngine, the whole batch. Returns the initial state
    dict, per-step (loss, grad_norm), {name: {fp32, exp_avg, exp_avg_sq}} after SAVE_AT steps, and
    the final weights."""
    from megaflow.train import PlainEngine
    model = build_model(cfg.model, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    engine = PlainEngine(model, cfg, None)
    batch, noise, keep = data(cfg)
    history, at_save = [], {}
    for step in range(STEPS):
        out = engine.train_step(batch, noise, keep, lr(cfg, step))
        history.append((out["loss"], out["grad_norm"]))
        if step + 1 == SAVE_AT:
            opt = engine.optimizer.state
            at_save = {n: {"fp32": p.detach().clone(), "exp_avg": opt[p]["exp_avg"].clone(),
                           "exp_avg_sq": opt[p]["exp_avg_sq"].clone()}
                       for n, p in model.named_parameters() if p.requires_grad}
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return state, history, at_save, final


def zero_engine(cfg: Config, topo: Topology, state: dict, dtype=None):
    """The build order: meta -> TP -> PP split -> load the full state dict -> ZeRO."""
    from parallel.tensor_parallel import build_tp_model
    from parallel.zero import ZeroEngine
    if cfg.parallel.pp == 1:
        return ZeroEngine(build_tp_model(cfg.model, topo, cfg.parallel, state_dict=state), cfg, dtype, topo)
    from parallel.pipeline import TiedEmbeddings, load_stages, split_stages
    p = cfg.parallel
    with torch.device("meta"):
        model = STARFlow2(cfg.model)
    apply_stage(model, cfg.model.stage)
    stages = split_stages(model, topo.pp, topo.pp_rank, p.schedule, p.virtual_stages, p.micro_batches, verbose=False)
    load_stages(stages, state)
    return ZeroEngine(None, cfg, dtype, topo, stages=stages, tied=TiedEmbeddings(stages, topo))


def run_steps(engine, cfg: Config, topo: Topology, steps: range, save_dir=None) -> list:
    batch, noise, keep = data(cfg)
    rows = slice(topo.dp_rank * ROWS // topo.dp, (topo.dp_rank + 1) * ROWS // topo.dp)
    local = {k: v[rows] for k, v in batch.items()}
    out = []
    for step in steps:
        r = engine.train_step(local, noise[rows], keep[rows], lr(cfg, step))
        out.append((r["loss"], r["grad_norm"]))
        if save_dir is not None and step + 1 == SAVE_AT:
            engine.save(save_dir)
    return out


def check_close(where: str, got: list, want: list, tol: float, relative: bool = False) -> None:
    """Loss within `tol` (times the loss if `relative`), gradient norm within `tol` relative."""
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want)):
        bound = tol * abs(ref_loss) if relative else tol
        assert abs(loss - ref_loss) < bound, f"{where}: step {step + 1} loss {loss} vs {ref_loss} without ZeRO"
        assert abs(norm - ref_norm) < tol * ref_norm, f"{where}: step {step + 1} grad norm {norm} vs {ref_norm}"


def check_state_bytes(where: str, engine, topo: Topology) -> dict:
    """Per-rank optimizer bytes ~ total / dp, and the total is 12 bytes per trainable parameter."""
    mine = engine.optimizer_state_bytes()
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p, _ in engine.named.values())
    total = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(total, group=topo.dp_group)
    total = float(total)
    assert abs(mine - total / topo.dp) <= 0.1 * total / topo.dp, f"{where}: {mine} bytes on this rank, total {total}"
    assert 12 * n_params <= total <= 1.01 * 12 * n_params, f"{where}: {total} bytes for {n_params} parameters"
    return {"bytes": mine, "total": total, "params": n_params}


def check_case(cfg: Config, topo: Topology, save_dir: Path, dtype=None) -> dict:
    """Equality with the run without ZeRO, state bytes, and save -> load -> continue."""
    where = f"ZeRO-{cfg.parallel.zero_stage} {topo} {dtype or 'fp32'}"
    state, ref_history, ref_at_save, ref_final = reference(cfg)
    engine = zero_engine(cfg, topo, state, dtype)
    if dtype is not None:
        p, _ = next(iter(engine.named.values()))
        from parallel.zero import master_partitions
        assert p.dtype == dtype and all(m.dtype == torch.float32 for m in master_partitions(engine.optimizer)), where
    history = run_steps(engine, cfg, topo, range(STEPS), save_dir)
    if dtype is None:
        check_close(where, history, ref_history, TOL)
    else:  # bf16 parameters and activations against the fp32 reference: bf16's rounding, 1%
        check_close(where, history, ref_history, BF16_RTOL, relative=True)
    sizes = check_state_bytes(where, engine, topo)
    weights = engine.model_state_dict()  # fp32 master values, gathered under ZeRO-3
    for name, w in weights.items():
        if topo.tp == 1 and name in ref_final:
            assert w.dtype == torch.float32, (where, name, w.dtype)
            if dtype is None:
                torch.testing.assert_close(w, ref_final[name], rtol=0, atol=TOL, msg=lambda m: f"{where} {name}: {m}")
    dist.barrier()
    resumed = zero_engine(cfg, topo, state, dtype)  # initial weights: load() must restore them
    resumed.load(save_dir)
    again = run_steps(resumed, cfg, topo, range(SAVE_AT, STEPS))
    want = history[SAVE_AT:]
    assert [x[0] for x in again] == [x[0] for x in want], f"{where}: resumed {again} vs {want}"
    # numpy, not tensors: tensors cross the result queue through shared memory that dies with the rank
    at_save = {n: {k: v.numpy() for k, v in d.items()} for n, d in ref_at_save.items()} if topo.rank == 0 else None
    return {"history": history, "ref_at_save": at_save, **sizes}


def _world2(rank, world, root):
    topo = Topology()
    out = {}
    for stage in (1, 2, 3):  # ZeRO-2/3 with two micro-batches: gradients partitioned per backward, summed
        cfg = zero_config(stage, micro_batches=1 if stage == 1 else 2)
        out[stage] = check_case(cfg, topo, Path(root) / f"zero{stage}")
    out["bf16"] = check_case(zero_config(1), topo, Path(root) / "bf16", torch.bfloat16)
    return out


def _reload_dp1(rank, world, root, histories):
    """One process (dp=1) resumes each DP=2 checkpoint."""
    topo = Topology()
    for stage in (1, 2, 3):
        cfg = zero_config(stage, micro_batches=1 if stage == 1 else 2)
        state = reference(cfg)[0]
        engine = zero_engine(cfg, topo, state)
        engine.load(Path(root) / f"zero{stage}")
        again = run_steps(engine, cfg, topo, range(SAVE_AT, STEPS))
        check_close(f"ZeRO-{stage} DP2 -> DP1", again, histories[stage][SAVE_AT:], TOL)


def check_full_state(save_dir: Path, ref_at_save: dict, ignore: tuple = ()) -> None:
    """The resharding reader gives the single-process fp32 weights and moments, by name."""
    from parallel.zero_checkpoint import read_full_state
    full = read_full_state(save_dir)
    assert full.pop("step") == SAVE_AT
    for name in ignore:
        full.pop(name)
    assert set(full) == set(ref_at_save), set(full) ^ set(ref_at_save)
    for name, want in ref_at_save.items():
        for k, t in want.items():
            t = torch.from_numpy(t)
            assert full[name][k].shape == t.shape, (save_dir.name, name, k, full[name][k].shape, t.shape)
            diff = float((full[name][k] - t).abs().max())
            if k == "fp32":  # weights: absolute, as tests/parallel/test_pp_dist.py (zero-initialised skips
                # move by ~lr per step whatever their gradient's size: Adam's sign, not its magnitude)
                assert diff < TOL, f"{save_dir.name} {name}: weight differs by {diff}"
            else:  # moments: relative to the tensor's largest entry (exp_avg_sq ~ gradient**2)
                err = diff / max(float(t.abs().max()), 1e-30)
                assert err < 1e-4, f"{save_dir.name} {name} {k}: relative error {err}"


def test_zero_stages_dp2_equal_one_process_save_load_reshard(tmp_path):
    results = run_distributed(_world2, 2, str(tmp_path))
    for stage in (1, 2, 3):
        r = results[0][stage]
        assert r["bytes"] == results[1][stage]["bytes"] or stage == 3, (stage, r, results[1][stage])
        check_full_state(tmp_path / f"zero{stage}", r["ref_at_save"])
    run_distributed(_reload_dp1, 1, str(tmp_path), {s: results[0][s]["history"] for s in (1, 2, 3)})


def test_build_ds_config_maps_ours_and_refuses_zero23_with_pp():
    from parallel.zero import build_ds_config
    cfg = zero_config(1)
    ds = build_ds_config(cfg, torch.bfloat16)
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] and "scheduler" not in ds and "optimizer" not in ds
    assert not build_ds_config(cfg)["bf16"]["enabled"]
    for stage in (2, 3):
        with pytest.raises(ValueError, match="use zero_stage=1 with pp > 1"):
            build_ds_config(zero_config(stage, pp=2))
    with pytest.raises(ValueError, match="0 = PlainEngine"):
        build_ds_config(zero_config(0))
    # parallel.overlap: ZeRO-2/3 reduce-scatter during backward (ZeRO-1 reduces once, at step())
    assert [build_ds_config(zero_config(s))["zero_optimization"]["overlap_comm"] for s in (1, 2, 3)] == [False, True, True]
    off = zero_config(2)
    off = dataclasses.replace(off, parallel=dataclasses.replace(off.parallel, overlap=False))
    assert not build_ds_config(off)["zero_optimization"]["overlap_comm"]
