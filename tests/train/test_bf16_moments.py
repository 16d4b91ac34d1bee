"""AdamW's moments in bf16 (train.moments_dtype=bf16; megaflow/optim.py MainWeights, megaflow/flat_adamw.py).

Contract: the flat AdamW step reads bf16 moments as fp32, updates them in fp32 and rounds them once as it stores
them; the fp32 main weights are untouched by that choice. So the first step from zero moments moves the main
weights bitwise as the fp32-moment step does and stores exactly its moments rounded to bf16; later steps follow
the fp32 path to bf16 rounding; a tiny model trains to the same held-out bits/dim as with fp32 moments (within
0.01, the bar of the bf16-weights precision test); the optimizer state (checkpoints) holds bf16 moments, a resume
takes the next step bitwise, and an fp32-moment state loads into a bf16-moment run (and back). Where no flat step
runs (fp32 weights, ZeRO) an explicit bf16 is refused by name, as is a bad value; 'auto' is bf16 in the flat step
and fp32 elsewhere.
"""
import copy
import dataclasses

import pytest
import torch

from megaflow.config import ConfigError, ParallelConfig, TrainConfig
from megaflow.model.starflow import build_model
from megaflow.optim import MainWeights, param_groups
from megaflow.train import PlainEngine
from tests.helpers import make_batch, make_noise
from tests.train.test_fast_step import run_config, train_tiny


def _steps(moments: str, n: int):
    cfg = run_config(moments_dtype=moments)
    batch = make_batch(cfg.model)
    model = build_model(cfg.model, seed=0)
    w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=True, flat_step=True)
    start = w.flat_main.clone()
    for s in range(n):
        w.zero_grad()
        model(batch, make_noise(cfg.model, batch, seed=s))[0].float().backward()
        w.grads_to_main()
        w.clip_and_step(1.0)
    return w, start


def test_first_step_is_the_fp32_step_and_its_moments_rounded_once():
    (w16, start), (w32, _) = _steps("bf16", 1), _steps("fp32", 1)
    assert w16._flat[0].dtype == torch.bfloat16 and w32._flat[0].dtype == torch.float32
    assert torch.equal(w16.flat_main, w32.flat_main) and torch.equal(w16.flat_param, w32.flat_param)
    assert torch.equal(w16._flat[0], w32._flat[0].to(torch.bfloat16))
    assert (w16.flat_main - start).abs().max() > 1e-4  # it stepped
    state = w16.optimizer.state_dict()["state"]
    assert {v["exp_avg"].dtype for v in state.values()} == {torch.bfloat16}  # what a checkpoint holds


def test_later_steps_follow_the_fp32_moments_to_bf16_rounding():
    (w16, start), (w32, _) = _steps("bf16", 4), _steps("fp32", 4)
    move16, move32 = w16.flat_main - start, w32.flat_main - start
    rel = float((move16 - move32).norm() / move32.norm())
    assert 0 < rel < 2e-2, rel  # not bitwise (the moments were rounded), but the same steps to bf16 rounding


def test_bf16_moments_train_like_fp32_moments():
    e32, _, bpd32 = train_tiny("bf16", bf16_grads="on")
    e16, _, bpd16 = train_tiny("bf16", bf16_grads="on", moments_dtype="bf16")
    assert e16.weights._flat[0].dtype == torch.bfloat16 and e32.weights._flat[0].dtype == torch.float32
    assert abs(bpd16 - bpd32) < 0.01, f"bf16 moments {bpd16:.4f} vs fp32 moments {bpd32:.4f} bits/dim"


def test_resume_with_bf16_moments_is_bitwise_and_fp32_states_load():
    cfg = run_config(dtype="bf16", param_dtype="bf16", bf16_grads="on", moments_dtype="bf16", lr=1e-3)
    engine = PlainEngine(build_model(cfg.model, seed=0), cfg, torch.bfloat16)
    for s in range(2):
        batch = make_batch(cfg.model, batch_size=2, seed=s)
        engine.train_step(batch, make_noise(cfg.model, batch, seed=s), None, 1e-3)
    saved = copy.deepcopy(engine.state_dict())
    weights = engine.model_state_dict()

    def restored(c):  # a fresh run given the checkpoint's weights and engine state
        model = build_model(cfg.model, seed=1)
        model.load_state_dict(weights)
        e = PlainEngine(model, c, torch.bfloat16)
        e.load_state_dict(copy.deepcopy(saved))
        return e
    resumed = restored(cfg)
    batch = make_batch(cfg.model, batch_size=2, seed=2)
    for e in (engine, resumed):
        e.train_step(batch, make_noise(cfg.model, batch, seed=2), None, 1e-3)
    assert torch.equal(resumed.weights.flat_main, engine.weights.flat_main)
    assert torch.equal(resumed.weights._flat[0], engine.weights._flat[0])
    # the same state into an fp32-moment run: its moments are the saved ones, upcast
    cfg32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, moments_dtype="fp32"))
    other = restored(cfg32)
    other.train_step(batch, make_noise(cfg.model, batch, seed=2), None, 1e-3)
    assert other.weights._flat[0].dtype == torch.float32
    rel = float((other.weights.flat_main - resumed.weights.flat_main).norm() / resumed.weights.flat_main.norm())
    assert rel < 1e-4, rel


def test_bf16_moments_are_refused_where_no_flat_step_runs():
    with pytest.raises(ConfigError, match="train.moments_dtype='fp16'"):
        dataclasses.replace(TrainConfig(), moments_dtype="fp16")
    with pytest.raises(ConfigError, match="parallel.zero_stage=2"):
        dataclasses.replace(run_config(moments_dtype="bf16"), parallel=ParallelConfig(zero_stage=2))
    cfg = run_config(moments_dtype="bf16")
    model = build_model(cfg.model, seed=0)
    with pytest.raises(ValueError, match="moments_dtype=bf16 needs bf16 weights"):
        MainWeights(model, param_groups(model, 0.05), cfg.train, torch.float32)
    w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=False, flat_step=False)
    with pytest.raises(ValueError, match="set train.moments_dtype=fp32"):
        w.step()


def test_auto_is_bf16_where_the_flat_step_runs_and_fp32_elsewhere():
    """'auto' (configs/h200_1b.yaml): bf16 moments in the flat step, torch's fp32 ones where it does not run (fp32
    weights: a CPU run of the same config), and no refusal with ZeRO (DeepSpeed keeps its own)."""
    w16, _ = _steps("auto", 1)
    assert w16._flat[0].dtype == torch.bfloat16
    cfg = run_config(moments_dtype="auto")
    model = build_model(cfg.model, seed=0)
    w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.float32)
    batch = make_batch(cfg.model)
    model(batch, make_noise(cfg.model, batch))[0].float().backward()
    w.clip_and_step(1.0)
    assert w._flat is None and {s["exp_avg"].dtype for s in w.optimizer.state.values()} == {torch.float32}
    dataclasses.replace(cfg, parallel=ParallelConfig(zero_stage=2))  # accepted
