"""Sharded (DCP) checkpoints reshard on load, at any layout, on real gloo processes.

Contract:
- an 8-process run, DP2 x TP2 x PP2 with ZeRO-1 (fp32, 2 micro-batches), saves after step 3
  (every rank its own shards; state/ + meta.json committed last) and runs to step 6;
- that checkpoint loads, optimizer state included, into TP4, PP4 (interleaved, 2 virtual
  stages), DP4 with ZeRO-2 (4 processes each) and into ONE process (PlainEngine), each from
  freshly initialised (different) weights; steps 4-6 on the same global batch give the
  uninterrupted run's losses (1e-5);
- evaluation under TP4, PP4 and DP4 ZeRO-3 (loaded from the same checkpoint) equals one
  process's on the same weights (1e-5), and neither save, load nor evaluation calls the gather
  (parallel.checkpoint_tp.gather_full raises if called).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from data_pipeline.config import DataConfig
from megaflow.config import Config, TrainConfig
from megaflow.optim import lr_at
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config
from tests.parallel.test_zero import deepspeed_ops  # noqa: F401 (fixture)

STEPS, SAVE_AT, ROWS, TOL = 6, 3, 4, 1e-5


def model_config():
    m = tiny_config(n_layers=8, ratio=1, shallow_heads=4)  # 8 Pretzel units: PP4 x 2 virtual stages
    return dataclasses.replace(m, stage="all", vlm=dataclasses.replace(m.vlm, n_kv_heads=4))


def config(tp=1, pp=1, zero=0, micro=1, schedule="1f1b", virtual=1) -> Config:
    return Config(model=model_config(), data=DataConfig(image_size=8, channels=1, patch_size=2),
                  train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup=2, steps=STEPS, grad_clip=1.0, weight_decay=0.1),
                  parallel=ParallelConfig(tp=tp, pp=pp, zero_stage=zero, micro_batches=micro, schedule=schedule,
                                          virtual_stages=virtual))


def data():
    batch = make_batch(model_config(), ROWS, 48)
    return batch, make_noise(model_config(), batch), torch.tensor([1.0, 0.0, 1.0, 1.0])


def no_gather(*a, **k):
    raise AssertionError("the whole model was gathered")


def build(cfg: Config, topo: Topology, seed: int):
    """This rank's engine at cfg's layout, freshly initialised (`seed`)."""
    import parallel.checkpoint_tp
    from parallel.runtime import build_engine, build_stages
    parallel.checkpoint_tp.gather_full = no_gather
    model, stages, tied = build_stages(cfg.model, cfg.parallel, topo, "cpu", seed, None, 48)
    return build_engine(cfg, model, stages, tied, topo, None)


def run_steps(engine, cfg: Config, topo, steps) -> list:
    batch, noise, keep = data()
    dp, r = (topo.dp, topo.dp_rank) if topo is not None else (1, 0)
    rows = slice(r * ROWS // dp, (r + 1) * ROWS // dp)
    t = cfg.train
    return [engine.train_step({k: v[rows] for k, v in batch.items()}, noise[rows], keep[rows],
                              lr_at(s, t.lr, t.min_lr, t.warmup, t.steps))["loss"] for s in steps]


def eval_batch():
    batch = make_batch(model_config(), 4, 48, seed=5)
    return batch, make_noise(model_config(), batch, seed=6)


def _save_run(rank, world, root):
    from parallel.checkpoint import FORMAT, save_distributed, save_engine_state
    cfg = config(tp=2, pp=2, zero=1, micro=2)
    topo = Topology(tp=2, pp=2)
    engine = build(cfg, topo, seed=0)
    losses = run_steps(engine, cfg, topo, range(SAVE_AT))
    path = save_distributed(Path(root), SAVE_AT, lambda d: save_engine_state(engine, d, topo), 2, topo,
                            {"sharded": FORMAT})
    losses += run_steps(engine, cfg, topo, range(SAVE_AT, STEPS))
    return {"losses": losses, "path": str(path), "files": sorted(p.name for p in (path / "state").iterdir())}


def _load_runs(rank, world, ckpt):
    from parallel.checkpoint import load_engine_state
    from parallel.evaluate import eval_terms
    out = {}
    layouts = {"tp4": (config(tp=4), dict(tp=4)),
               "pp4": (config(pp=4, micro=4, schedule="interleaved", virtual=2), dict(pp=4)),
               "dp4_zero2": (config(zero=2), {}),
               "dp4_zero3": (config(zero=3), {})}
    batch, noise = eval_batch()
    for name, (cfg, dims) in layouts.items():
        topo = Topology(**dims)
        engine = build(cfg, topo, seed=11 + rank)
        assert load_engine_state(engine, Path(ckpt), topo) == SAVE_AT
        terms, counts = eval_terms(engine, batch, noise, None)
        out[name] = {"eval": terms, "counts": counts}
        if name != "dp4_zero3":
            out[name]["losses"] = run_steps(engine, cfg, topo, range(SAVE_AT, STEPS))
    return out


def test_save_dp2_tp2_pp2_zero1_loads_at_tp4_pp4_dp4_zero2_and_one_process(tmp_path):
    saved = run_distributed(_save_run, 8, str(tmp_path / "ckpts"))
    want = saved[0]["losses"][SAVE_AT:]
    ckpt = Path(saved[0]["path"])
    assert (ckpt / "meta.json").is_file() and not (ckpt / "model.pt").exists()
    assert saved[0]["files"] == [".metadata"] + [f"__{r}_0.distcp" for r in range(8)]

    loaded = run_distributed(_load_runs, 4, str(ckpt))
    for name in ("tp4", "pp4", "dp4_zero2"):
        got = loaded[0][name]["losses"]
        assert max(abs(a - b) for a, b in zip(got, want)) < TOL, (name, got, want)

    # one process: PlainEngine from other weights, the checkpoint's shards read whole
    from megaflow.model.starflow import build_model
    from megaflow.train import PlainEngine
    from parallel.checkpoint import load_engine_state
    cfg = config()
    engine = PlainEngine(build_model(cfg.model, seed=99), cfg, None)
    assert load_engine_state(engine, ckpt) == SAVE_AT
    batch, noise = eval_batch()
    with torch.no_grad():
        engine.model.eval()
        terms = engine.model.terms(batch, noise)
        counts = engine.model.loss_counts(batch)
    got = run_steps(engine, cfg, None, range(SAVE_AT, STEPS))
    assert max(abs(a - b) for a, b in zip(got, want)) < TOL, ("one process", got, want)

    for name in ("tp4", "pp4", "dp4_zero3"):
        for r in range(4):
            ev = loaded[r][name]
            assert ev["counts"] == {"text": int(counts["text"]), "dims": int(counts["dims"])}, (name, ev)
            for k in ("flow_sum", "text_sum"):
                assert abs(ev["eval"][k] - float(terms[k])) < TOL * max(1.0, abs(float(terms[k]))), (name, k, ev)


def _from_one_process(rank, world, root):
    from parallel.checkpoint_convert import load_engine_from_one_process
    model_pt = torch.load(Path(root) / "model.pt")
    optim_pt = torch.load(Path(root) / "optim.pt", weights_only=False)
    out = {}
    for name, cfg, dims in (("tp2", config(tp=2), dict(tp=2)), ("dp2_zero1", config(zero=1), {})):
        topo = Topology(**dims)
        engine = build(cfg, topo, seed=21 + rank)
        assert load_engine_from_one_process(engine, model_pt, optim_pt, cfg.model, cfg.train, topo) == SAVE_AT
        out[name] = run_steps(engine, cfg, topo, range(SAVE_AT, STEPS))
    return out


def test_one_process_checkpoint_loads_at_tp2_and_dp2_zero1(tmp_path):
    """A one-process checkpoint (model.pt + the PlainEngine's optim.pt, entries numbered, not named)
    loads into TP2 and DP2 ZeRO-1 engines with its optimizer state: steps 4-6 give the one-process
    continuation's losses (1e-5)."""
    from megaflow.model.starflow import build_model
    from megaflow.train import PlainEngine
    cfg = config()
    engine = PlainEngine(build_model(cfg.model, seed=0), cfg, None)
    run_steps(engine, cfg, None, range(SAVE_AT))
    torch.save(engine.model.state_dict(), tmp_path / "model.pt")
    torch.save(engine.state_dict(), tmp_path / "optim.pt")
    want = run_steps(engine, cfg, None, range(SAVE_AT, STEPS))
    for name, got in run_distributed(_from_one_process, 2, str(tmp_path))[0].items():
        assert max(abs(a - b) for a, b in zip(got, want)) < TOL, (name, got, want)
