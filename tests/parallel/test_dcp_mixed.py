"""Sharded checkpoints under the engines' mixed precision (bf16 parameters with fp32 main weights,
megaflow.optim.MainWeights, the CUDA default): the checkpoint holds the fp32 main weights and AdamW's
moments of them; a fresh bf16 engine loaded from it has the same main weights, moments and step,
its bf16 parameters are those main weights rounded, and it continues exactly as the engine that saved.
One process (DCP without a process group); the multi-process layouts share this code path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megaflow.model.starflow import build_model
from megaflow.train import PlainEngine
from parallel.checkpoint_state import load_engine, save_engine
from tests.parallel.test_dcp_reshard import config, data

LR = 2e-3


def bf16_engine(seed: int, **train) -> PlainEngine:
    cfg = config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, param_dtype="bf16", compile="off", **train))
    return PlainEngine(build_model(cfg.model, seed=seed), cfg, torch.bfloat16)


def step(engine) -> float:
    batch, noise, keep = data()
    return float(engine.train_step(batch, noise, keep, LR)["loss"])


def test_bf16_engine_saves_main_weights_and_resumes_exactly(tmp_path):
    a = bf16_engine(seed=0)
    assert a.weights.mixed and next(a.model.parameters()).dtype == torch.bfloat16
    step(a), step(a)
    save_engine(a, tmp_path / "state")
    b = bf16_engine(seed=1)  # other weights: everything must come from the checkpoint
    assert load_engine(b, tmp_path / "state") == 2
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        main_a, main_b = a.weights.main_of(p), b.weights.main_of(q)
        assert main_b.dtype == torch.float32 and torch.equal(main_a, main_b), n  # full precision kept
        assert torch.equal(p, q), n
        sa, sb = a.optimizer.state[main_a], b.optimizer.state[main_b]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k], sb[k]), (n, k)
        assert float(sa["step"]) == float(sb["step"]) == 2
    assert step(a) == step(b)


def test_bf16_moments_survive_a_sharded_checkpoint(tmp_path):
    """train.moments_dtype=bf16 (the flat step; on the CPU through train.bf16_grads=on): the checkpoint holds the
    bf16 moments, a fresh engine loads their values exactly (held in the main weights' dtype until its first step
    copies them into its bf16 buffers) and continues exactly as the one that saved."""
    a = bf16_engine(seed=0, bf16_grads="on", moments_dtype="bf16")
    step(a), step(a)
    assert a.weights._flat[0].dtype == torch.bfloat16
    save_engine(a, tmp_path / "state")
    b = bf16_engine(seed=1, bf16_grads="on", moments_dtype="bf16")
    assert load_engine(b, tmp_path / "state") == 2
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        sa, sb = a.optimizer.state[a.weights.main_of(p)], b.optimizer.state[b.weights.main_of(q)]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k].float(), sb[k].float()), k
    assert step(a) == step(b)
    assert torch.equal(a.weights.flat_main, b.weights.flat_main) and torch.equal(a.weights._flat[0], b.weights._flat[0])
    assert b.weights._flat[0].dtype == torch.bfloat16


def test_finite_check_reads_the_main_weights_in_place(tmp_path, monkeypatch):
    """Under bf16 parameters the finite check before a save reads the fp32 main weights themselves
    (no copy: the save copies them once, for model.pt) and still finds a NaN that only the main
    weights hold (the bf16 parameter is finite)."""
    from megaflow.train import check_finite
    engine = bf16_engine(seed=0)
    step(engine)
    cfg = config()
    p = next(engine.model.parameters())
    view = engine.model_state_dict(copy=False)
    name = next(n for n, q in engine.model.named_parameters() if q is p)
    assert view[name] is not None and view[name].data_ptr() == engine.weights.main_of(p).data_ptr()

    def no_copy(*a, **k):
        raise AssertionError("the finite check copied a tensor")
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "clone", no_copy)
        m.setattr(torch.Tensor, "float", no_copy)
        check_finite(engine, None, "cpu", 1, cfg, tmp_path)  # finite: no error, nothing copied
    with torch.no_grad():
        engine.weights.main_of(p).view(-1)[0] = float("nan")
    assert torch.isfinite(p).all()
    with pytest.raises(FloatingPointError, match=f"NaN/Inf in model.{name} after step 1"):
        check_finite(engine, None, "cpu", 1, cfg, tmp_path)
