"""bf16 gradients for the one-backward step (train.bf16_grads; megaflow/optim.py MainWeights, the write mode of
parallel/wgrad_fusion.py, megaflow/flat_adamw.py reading bf16 gradients).

Contract: with one backward per step each weight's gradient is one bf16 GEMM output, so keeping it in a flat
bf16 buffer (each linear's GEMM writing its view, the rest copied in) and upcasting it where the norm and the
flat AdamW read it gives the update of the fp32 main-gradient path: over 4 steps with clipping, a skipped NaN
step and a shared layer, the bf16 weights are bitwise those of the old path and the fp32 main weights and moments
agree to 1e-6 relative (the only difference is the order of the norm's fp32 sum, which enters the update through
the clipping factor: a relative change of ~1e-7 of a step of size lr). A weight used twice in one forward gets the
sum of its two products (the second added, not written over), also through torch.compile's AOTAutograd; a head
tied to an embedding gets both gradients (its GEMM's and autograd's); each step's first product is written over the
last step's. No fp32 gradient buffer exists on this path. PlainEngine turns it on by config ('on' on the CPU here),
trains as with 'off' and resumes from its state bitwise; bad values are refused by name.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from megaflow.config import ConfigError, TrainConfig
from megaflow.model.starflow import build_model
from megaflow.optim import MainWeights, param_groups, resolve_bf16_grads
from megaflow.train import PlainEngine
from parallel.wgrad_fusion import apply_grad_writes
from tests.helpers import make_batch, make_noise
from tests.train.test_fast_step import run_config


def _weights(model, cfg, bf16_grads: bool) -> MainWeights:
    w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=True, flat_step=True,
                    bf16_grads=bf16_grads)
    if bf16_grads:
        apply_grad_writes([model], w)
    return w


def test_bf16_grads_step_equals_the_fp32_gradient_path():
    cfg = run_config()
    batch = make_batch(cfg.model)
    runs = {}
    for bf16 in (False, True):
        model = build_model(cfg.model, seed=0)
        w = _weights(model, cfg, bf16)
        norms = []
        for s in range(4):
            w.optimizer.param_groups[0]["lr"] = w.optimizer.param_groups[1]["lr"] = 1e-3 * (s + 1)
            w.zero_grad()
            model(batch, make_noise(cfg.model, batch, seed=s))[0].float().backward()
            w.grads_to_main()
            if s == 2:  # a NaN gradient: the step is skipped
                (w.flat_grad if bf16 else w.flat_main_grad)[0] = float("nan")
            norm, skipped = w.clip_and_step(1e-2 if s else 0.0)
            norms.append(float(norm))
            assert float(skipped) == (s == 2)
        runs[bf16] = (w, model, norms)
    (new, new_model, new_norms), (old, old_model, old_norms) = runs[True], runs[False]
    assert new.flat_main_grad is None and all(p.grad is None for p in new.params)  # no fp32 gradient anywhere
    assert len(new.wgrad_fused) >= 10 and all(p.grad is None for p in new_model.parameters())
    torch.testing.assert_close(torch.tensor(new_norms[:2]), torch.tensor(old_norms[:2]), rtol=1e-6, atol=0)
    assert torch.equal(new.flat_param, old.flat_param)  # the bf16 weights
    torch.testing.assert_close(new.flat_main, old.flat_main, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(new._flat[0], old._flat[0], rtol=1e-6, atol=1e-12)  # the moments
    assert all(float(new.optimizer.state[p]["step"]) == 3.0 for p in new.params)


def test_bf16_grads_fall_back_to_torch_adamw_with_fp32_gradients():
    """Where the flat step does not apply after all (here: turned off after construction, as MainWeights does when
    its kernel cannot run), torch's AdamW steps fp32 gradients made from the bf16 buffer, the clipping divided in
    (torch's unfused AdamW takes no grad_scale): the fp32 path's update, to the clipping factor's rounding."""
    cfg = run_config()
    batch = make_batch(cfg.model)
    runs = []
    for bf16 in (False, True):
        model = build_model(cfg.model, seed=0)
        w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=False, flat_step=bf16 or None,
                        bf16_grads=bf16)
        w.flat_step = False
        start = w.flat_main.clone()
        for s in range(2):
            w.zero_grad()
            model(batch, make_noise(cfg.model, batch, seed=s))[0].float().backward()
            w.grads_to_main()
            w.clip_and_step(1e-2)
        runs.append(w)
    old, new = runs
    assert new.flat_main_grad is not None and not hasattr(new.optimizer, "grad_scale")
    torch.testing.assert_close(new.flat_main, old.flat_main, rtol=1e-5, atol=1e-7)
    assert (new.flat_main - start).abs().max() > 1e-4  # it stepped


class Shared(nn.Module):
    """One linear applied twice in a forward (a shared layer), another once; a head tied to an embedding (the
    head's GEMM writes the gradient, autograd hands over the embedding's: the two must be summed)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 8)
        self.embed, self.head = nn.Embedding(8, 16), nn.Linear(16, 8, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):  # x (B, 16)
        h = self.a(torch.tanh(self.a(x)))  # (B, 16)
        tokens = self.b(torch.tanh(h)).argmax(-1)  # (B,)
        return self.b(torch.tanh(h)) + self.head(self.embed(tokens) + h)  # (B, 8)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_write_mode_adds_a_second_use_and_writes_over_the_last_step(compiled):
    torch.manual_seed(0)
    ref = Shared().to(torch.bfloat16)
    model = Shared().to(torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    w = MainWeights(model, param_groups(model, 0.0), TrainConfig(), torch.bfloat16, bf16_grads=True)
    apply_grad_writes([model], w)
    assert w.wgrad_fused == {id(model.a.weight), id(model.b.weight), id(model.embed.weight)}
    run = torch.compile(model, backend="aot_eager") if compiled else model
    for step in range(2):
        x = torch.randn(4, 16, dtype=torch.bfloat16)
        w.zero_grad()
        ref.zero_grad(set_to_none=True)
        run(x).float().pow(2).sum().backward()
        ref(x).float().pow(2).sum().backward()
        w.grads_to_main()
        for name in ("a.weight", "b.weight", "b.bias", "embed.weight"):
            got, want = w.grad_of(dict(model.named_parameters())[name]), dict(ref.named_parameters())[name].grad
            # autograd rounds each use's bf16 product and their bf16 sum, the write mode adds in place: bf16 rounding
            # apart (a product lost or written over: off by a whole term, tens of percent here)
            err = float((got.float() - want.float()).norm() / want.float().norm())
            assert err < 1e-2, (name, step, err)
        assert model.a.weight.grad is None and model.b.weight.grad is None
    assert torch.equal(w.grad_of(model.b.weight), ref.b.weight.grad)  # one use: autograd's GEMM, written in place


def test_plain_engine_bf16_grads_trains_like_fp32_grads():
    """PlainEngine with train.bf16_grads=on (CPU, bf16 weights and compute) follows =off: the same first loss and
    gradient norm, the next losses to bf16 rounding (off's CPU AdamW is torch's, not the flat step). Resumed from
    its model and optimizer state (as a checkpoint holds them), an 'on' engine takes the next step bitwise as the
    one that goes on."""
    out = {}
    for mode in ("off", "on"):
        cfg = run_config(dtype="bf16", param_dtype="bf16", bf16_grads=mode, grad_clip=1.0, lr=1e-3)
        model = build_model(cfg.model, seed=0)
        engine = PlainEngine(model, cfg, torch.bfloat16)
        assert engine.weights.bf16_grads == (mode == "on")
        res = []
        for s in range(3):
            batch = make_batch(cfg.model, batch_size=2, seed=s)
            res.append(engine.train_step(batch, make_noise(cfg.model, batch, seed=s), None, 1e-3))
        out[mode] = [(float(r["loss"]), float(r["grad_norm"])) for r in res]
    assert engine.weights.wgrad_fused and engine.weights.flat_main_grad is None  # 'on'
    model = build_model(cfg.model, seed=1)
    model.load_state_dict(engine.model_state_dict())
    resumed = PlainEngine(model, cfg, torch.bfloat16)
    resumed.load_state_dict(copy.deepcopy(engine.state_dict()))
    batch = make_batch(cfg.model, batch_size=2, seed=3)
    for e in (engine, resumed):
        e.train_step(batch, make_noise(cfg.model, batch, seed=3), None, 1e-3)
    assert torch.equal(resumed.weights.flat_main, engine.weights.flat_main)
    assert out["on"][0][0] == out["off"][0][0]
    torch.testing.assert_close(out["on"][0][1], out["off"][0][1], rtol=1e-5, atol=0)
    for (a, _), (b, _) in zip(out["on"][1:], out["off"][1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=0)


def test_bf16_grads_mode_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_bf16_grads("auto", torch.bfloat16, cuda, False)
    assert not resolve_bf16_grads("auto", torch.bfloat16, cpu, False)
    assert not resolve_bf16_grads("auto", torch.bfloat16, cuda, True)  # data parallelism sums fp32 gradients
    assert not resolve_bf16_grads("auto", torch.float32, cuda, False)
    assert resolve_bf16_grads("on", torch.bfloat16, cpu, False)
    assert not resolve_bf16_grads("off", torch.bfloat16, cuda, False)
    with pytest.raises(ValueError, match="param_dtype=bf16"):
        resolve_bf16_grads("on", torch.float32, cpu, False)
    with pytest.raises(ValueError, match="data parallelism"):
        resolve_bf16_grads("on", torch.bfloat16, cuda, True)
    with pytest.raises(ConfigError, match="train.bf16_grads='yes'"):
        dataclasses.replace(TrainConfig(), bf16_grads="yes")
    with pytest.raises(ValueError, match="bf16_grads=off"):
        MainWeights(nn.Linear(4, 4), [{"params": list(nn.Linear(4, 4).parameters())}], TrainConfig(), torch.float32,
                    bf16_grads=True)
