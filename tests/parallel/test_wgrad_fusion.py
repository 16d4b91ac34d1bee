"""Gradient-accumulation fusion (parallel/wgrad_fusion.py, issue 17's PP2 row): each linear's weight-gradient
GEMM adds into its fp32 main gradient instead of writing a bf16 .grad that a flush adds after every backward.

Contract: over several micro-batches a fused linear's main gradient is the fp32 sum of the fp32 products dy^T x
(eager and through torch.compile's AOTAutograd, where the accumulation is a mutation inside the compiled
backward), the unfused bf16 path's sum to bf16 rounding; its input and bias gradients are the unfused ones
bitwise and its weight's .grad stays None. Through the pipeline engine (4 micro-batches, bf16 weights, tied
embeddings) fusion on gives the losses of fusion off and its gradients to bf16 rounding, also at the second
step (the fused main gradients start each step from zero, not from the last step's). The PP=2 schedule as the
CUDA graph captures it, fused, is tests/parallel/test_overlap.py's interleaved case.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from data_pipeline.config import DataConfig
from megaflow.config import Config, TrainConfig
from parallel.topology import ParallelConfig, Topology
from parallel.wgrad_fusion import FusedWgradLinear, apply_wgrad_fusion, fusion_wanted
from tests.helpers import make_batch, make_noise
from tests.parallel.test_pp_dist import _config


def _linears(bias: bool):
    torch.manual_seed(0)
    plain = nn.Linear(32, 24, bias=bias).to(torch.bfloat16)
    fused = nn.Linear(32, 24, bias=bias).to(torch.bfloat16)
    fused.load_state_dict(plain.state_dict())
    main = torch.zeros(24, 32)
    assert apply_wgrad_fusion([nn.Sequential(fused)], lambda w: main) == [fused.weight]
    assert type(fused) is FusedWgradLinear
    return plain, fused, main


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_fused_linear_accumulates_the_fp32_sum_of_its_micro_batches(compiled):
    plain, fused, main = _linears(bias=True)
    run = torch.compile(lambda lin, x, r: (lin(x) * r).sum(), backend="aot_eager") if compiled else \
        (lambda lin, x, r: (lin(x) * r).sum())
    unfused, exact = torch.zeros(24, 32), torch.zeros(24, 32)
    for i in range(3):  # micro-batches
        x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
        r = torch.randn(2, 5, 24, dtype=torch.bfloat16)  # d loss / d y
        xs = [x.clone().requires_grad_() for _ in range(2)]
        run(fused, xs[0], r).backward()
        (plain(xs[1]) * r).sum().backward()
        assert torch.equal(xs[0].grad, xs[1].grad)  # dx as nn.Linear's
        unfused += plain.weight.grad.float()  # the flush: the bf16 product added in fp32
        plain.weight.grad = None
        exact += r.float().reshape(-1, 24).t() @ x.float().reshape(-1, 32)
        assert fused.weight.grad is None  # nothing written in bf16: the product went into `main`
    torch.testing.assert_close(main, exact, rtol=1e-5, atol=1e-5)
    assert (main - unfused).norm() < 1e-2 * exact.norm()  # the unfused sum: bf16 rounding apart
    assert not torch.equal(main, unfused)  # and it did round: the fused sum is the fp32 one
    assert torch.equal(fused.bias.grad, plain.bias.grad)  # the bias's gradient takes the usual path


def test_fused_linear_without_gradient_is_the_plain_linear():
    plain, fused, main = _linears(bias=False)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
    assert torch.equal(main, torch.zeros(24, 32))


def _engine(fusion: str):
    from parallel.engine import ParallelEngine
    from parallel.runtime import build_stages
    cfg = Config(model=_config(4, tie=True), data=DataConfig(image_size=8, channels=1, patch_size=2),
                 train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup=0, steps=4, grad_clip=1.0, weight_decay=0.1,
                                   dtype="bf16", param_dtype="bf16"),
                 parallel=ParallelConfig(micro_batches=4, grad_accum_fusion=fusion))
    topo = Topology(rank=0, world_size=1)
    model, stages, tied = build_stages(cfg.model, cfg.parallel, topo, "cpu", 0, None, 48)
    return ParallelEngine(stages, cfg, torch.bfloat16, topo, tied)


def test_engine_with_fusion_equals_it_without():
    mcfg = _config(4, tie=True)
    batch = make_batch(mcfg, 4, 48)  # 4 micro-batches of one row
    noise = make_noise(mcfg, batch)
    out = {}
    for fusion in ("off", "on"):
        engine = _engine(fusion)
        losses, grads = [], []
        for step in range(2):
            losses.append(float(engine.train_step(batch, noise, None, 1e-3)["loss"]))
            grads.append({n: engine.weights.main_of(p).grad.clone() for st in engine.stages
                          for n, p in st.module.named_parameters()})
            assert all(p.grad is None for p in engine.weights.model_params), step  # no bf16 gradient left behind
        named = [(n, p) for st in engine.stages for n, p in st.module.named_parameters()]
        fused = {n for n, p in named if id(p) in engine.weights.wgrad_fused}
        out[fusion] = dict(losses=losses, grads=grads, fused=fused,
                           linears=sum(isinstance(m, nn.Linear) for st in engine.stages for m in st.module.modules()))
    off, on = out["off"], out["on"]
    assert not off["fused"] and len(on["fused"]) >= on["linears"] - 2, on  # every bf16 linear but the FAE's (fp32)
    assert on["losses"][0] == off["losses"][0]  # the same forward
    torch.testing.assert_close(on["losses"][1], off["losses"][1], rtol=1e-3, atol=0)
    for step in range(2):  # the same gradients to bf16 rounding; step 2's not on top of step 1's
        a, b = (torch.cat([g[n].reshape(-1) for n in sorted(g)]) for g in (on["grads"][step], off["grads"][step]))
        assert (a - b).norm() < 1e-2 * b.norm(), (step, float((a - b).norm() / b.norm()))
    # the first step's other gradients (norms, embeddings, biases: flushed through the fp32 scratch with fusion) each
    # agree to 1e-3 (the input gradients reaching them round alike but for the matmul's CPU path); a micro-batch
    # lost or doubled would be off by ~25%
    rest = [n for n in off["grads"][0] if n not in on["fused"]]
    assert len(rest) > 10, rest
    for n in rest:
        a, b = on["grads"][0][n], off["grads"][0][n]
        assert (a - b).norm() <= 1e-3 * b.norm(), (n, float((a - b).norm() / b.norm()))


def test_flush_beside_fused_gradients_is_zero_plus_every_gradient():
    """With fused weights (MainWeights.wgrad_fused) the step starts from zeroed fp32 gradients, and each deferred flush
    adds the other parameters' bf16 gradients through an fp32 scratch (one multi-tensor cast and one add instead of a
    mixed-dtype add a tensor): bitwise 0 + g1 + g2 in fp32; the fused weight's is the fp32 sum of fp32 products."""
    from megaflow.optim import MainWeights, param_groups
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    weights = MainWeights(model, param_groups(model, 0.0), TrainConfig(), torch.bfloat16, flat_grads=False)
    ref = copy.deepcopy(model)  # plain bf16 linears give the expected gradients (autograd.grad through a fused one adds)
    weights.wgrad_fused = {id(w) for w in apply_wgrad_fusion([model[1]], lambda w: weights.main_of(w).grad)}
    weights.flat_main_grad.fill_(7.0)  # last step's values: zero_grad must clear them
    weights.zero_grad()
    weights.defer = True
    rest = [p for p in model.parameters() if p is not model[1].weight]
    ref_rest = [p for p in ref.parameters() if p is not ref[1].weight]
    want = [torch.zeros(p.shape) for p in rest]
    exact = torch.zeros(8, 8)
    for _ in range(2):
        x = torch.randn(4, 8, dtype=torch.bfloat16)
        h = ref[0](x)  # (4, 8): the middle layer's input
        y = ref[1](h)
        loss = ref[2](y).float().pow(2).sum()
        dy = torch.autograd.grad(loss, y, retain_graph=True)[0]
        exact += dy.float().t() @ h.detach().float()
        for w, g in zip(want, torch.autograd.grad(loss, ref_rest)):
            w.add_(g.float())
        model(x).float().pow(2).sum().backward()
        assert model[1].weight.grad is None
        weights.flush_grads()
        assert all(p.grad is None for p in rest)
    for p, w in zip(rest, want):
        assert torch.equal(weights.main_of(p).grad, w)
    torch.testing.assert_close(weights.main_of(model[1].weight).grad, exact, rtol=1e-5, atol=1e-6)
    assert len(weights._scratches) == 1  # one buffer, made once, reused by the second micro-batch


def test_fusion_mode_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fusion_wanted("auto", True, 8, cuda, 1, True)
    assert not fusion_wanted("auto", True, 8, cpu, 1, True)  # the CPU keeps the unfused path unless asked
    assert not fusion_wanted("auto", True, 1, cuda, 1, True)  # one micro-batch: nothing to accumulate
    assert not fusion_wanted("auto", True, 8, cuda, 2, True)  # DP buckets wait for .grad hooks
    assert not fusion_wanted("auto", True, 8, cuda, 1, True, tp=2) and fusion_wanted("on", True, 8, cuda, 1, True, tp=2)
    assert not fusion_wanted("auto", False, 8, cuda, 1, True) and not fusion_wanted("off", True, 8, cuda, 1, True)
    assert fusion_wanted("on", True, 8, cpu, 2, False)
    with pytest.raises(ValueError, match=r"grad_accum_fusion=on .* set train.param_dtype=bf16"):
        fusion_wanted("on", False, 8, cuda, 1, True)
    with pytest.raises(ValueError, match=r"parallel.overlap at dp=2.*set parallel.overlap=false"):
        fusion_wanted("on", True, 8, cuda, 2, True)
    with pytest.raises(ValueError, match=r"parallel.grad_accum_fusion='yes' must be 'auto', 'on' or 'off'"):
        dataclasses.replace(ParallelConfig(), grad_accum_fusion="yes")
