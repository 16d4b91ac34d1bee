"""FP8 on torch's own `_scaled_mm` (megaflow/fp8.py, parallel.fp8_backend='torch'), on the CPU, where
torch runs `_scaled_mm` too (slowly; the speed is the H200's business, docs/benchmarks.md).

Contract:
- a Float8Linear computes x W^T, dx and dW within FP8 rounding of the fp32 reference (e4m3 forward,
  e5m2 gradients: a few % relative) and visibly not in bf16 (the error is above bf16's); without a
  gradient being recorded (evaluation, generation) it is the bf16 layer exactly; its state dict is
  the nn.Linear's;
- `apply_fp8` swaps exactly the block linears of both dimensions >= min_dim (embeddings, heads and the
  narrow shallow flows stay nn.Linear), and the swapped model's loss stays within FP8 rounding of the
  original's;
- compiled (torch.compile, aot_eager on the CPU) the FP8 block gives the eager FP8 block's output
  and gradients;
- with `split_t` (parallel.fp8_split_transpose) the block gives bit-identical outputs and gradients,
  eager and compiled; compiled, its forward graph makes x's transposed FP8 copy by the opaque
  `megaflow::fp8_transpose` (one per FP8 linear: no transposed store for inductor to fuse into the
  norm + cast kernel) and saves it, and its backward graph never remakes it;
- with `one_read` (parallel.fp8_one_read: x, W, dy cast in both layouts by `megaflow::fp8_cast_t`, whose
  CPU body is the reference cast) the block gives bit-identical outputs and gradients eager, and compiled
  its graphs cast x and W (forward) and dy (backward) by it and write no transposed FP8 copy of their own;
  'xo' resolves to x for the output projections only; an unknown operand is refused;
- the pipeline engine built by `build_stages` with fp8_backend='torch' (and fp8_split_transpose, fp8_one_read)
  swaps the layers and trains to the bf16 losses within FP8 tolerance (no TE context is entered);
- under tensor parallelism (2 gloo ranks, with and without sequence parallelism, built by
  `build_stages` as `megaflow train` builds it) the column- and row-parallel block layers run their
  GEMMs in FP8 (each rank scaling its own shard): loss and gathered gradients within FP8 rounding of
  the fp32 single-process model and of the single-process FP8 model, and visibly not bf16-exact
  (with sequence parallelism under delayed scaling, whose histories each layer fills; without it with
  parallel.fp8_one_read, which reaches the parallel layers);
- delayed scaling (parallel.fp8=delayed): a layer's first FP8 call is current scaling's exactly and
  fills the (x, W, dy) amax history; later calls scale by the history's maxima, within FP8 rounding of
  current scaling and not equal to it; compiled (aot_eager and inductor's graph, one graph for the filling
  call and one after) as eager; two forwards before their backwards (micro-batches) work; the
  history survives `fp8_state` -> `load_fp8_state` (a resumed layer continues exactly as the
  uninterrupted one) and a cast to bf16 parameters; `fp8_bf16_ends` keeps the first and last VLM
  blocks bf16 (also in pipeline stages); `set_fp8_on(False)` (parallel.fp8_start_step) gives the
  bf16 layer exactly and leaves the history alone (in pipeline stages too, switched through the model);
- bad configs get one clear error: fp8_backend='torch' with backend 'te', with async TP under
  sequence parallelism, a negative fp8_bf16_ends or fp8_start_step, fp8_start_step with a step graph,
  and `megaflow train` on a CPU.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import pytest
import torch
import torch.nn as nn

from megaflow.fp8 import Float8Linear, apply_fp8, fp8_state, load_fp8_state, set_fp8_on, to_float8
from megaflow.model.layers import AttnContext, TransformerBlock, rope_tables
from megaflow.model.starflow import build_model
from megaflow.optim import cast_params
from tests.helpers import make_batch, make_noise, tiny_config


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_float8_linear_math_against_fp32():
    torch.manual_seed(0)
    ref = nn.Linear(128, 96)
    lin = to_float8(copy.deepcopy(ref))
    assert isinstance(lin, Float8Linear) and lin.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 16, 128)
    dy = torch.randn(4, 16, 96)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = lin(xa), ref(xb)
    y.backward(dy)
    yr.backward(dy)
    errs = [rel(y, yr), rel(xa.grad, xb.grad), rel(lin.weight.grad, ref.weight.grad)]
    assert all(1e-2 < e < 0.12 for e in errs), errs  # FP8 rounding: above bf16's ~4e-3, under e5m2's ~6%
    assert torch.equal(lin.bias.grad, ref.bias.grad)
    with torch.no_grad():  # evaluation / generation: the plain layer
        assert torch.equal(lin(x), ref(x))
    odd = torch.randn(3, 5, 128, requires_grad=True)  # 15 rows: not an FP8 GEMM shape, bf16 for this call
    assert torch.equal(lin(odd), ref(odd))


def test_apply_fp8_size_rule_and_model_loss():
    cfg = dataclasses.replace(tiny_config(), stage="all")
    ref = build_model(cfg, "cpu", seed=0)
    model = copy.deepcopy(ref)
    names = apply_fp8(model, min_dim=32)
    kinds = {(n.split(".")[0], n.rsplit(".", 1)[-1]) for n in names}
    assert {k for _, k in kinds} == {"qkv", "o_proj", "gate_up", "down_proj"}
    assert not any("shallow" in n for n in names)  # width 16 < 32
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if "shallow" in n and isinstance(m, nn.Linear))
    assert type(model.gauss_head) is nn.Linear and model.state_dict().keys() == ref.state_dict().keys()
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    noise = make_noise(cfg, batch)
    with torch.no_grad():  # no gradient recorded (evaluation): the plain layers, the same loss
        assert torch.equal(model(batch, noise)[0], ref(batch, noise)[0])
    loss, ref_loss = model(batch, noise)[0].detach(), ref(batch, noise)[0].detach()
    assert 0 < abs(float(loss - ref_loss)) < 0.02 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    fast = copy.deepcopy(ref)  # parallel.fp8_fast_accum reaches every swapped layer (default off)
    assert apply_fp8(fast, min_dim=32, fast_accum=True) == names
    assert all(m.fast_accum for m in fast.modules() if isinstance(m, Float8Linear))
    assert not any(m.fast_accum for m in model.modules() if isinstance(m, Float8Linear))


def test_compiled_fp8_block_equals_eager():
    torch.manual_seed(0)
    block = TransformerBlock(64, 4, 2, 16, 128)
    apply_fp8(block, min_dim=64, where=lambda name, mod: True)
    assert isinstance(block.mlp.gate_up, Float8Linear) and isinstance(block.self_attn.o_proj, Float8Linear)
    cos, sin = rope_tables(torch.arange(32)[None], 16, 10000.0)
    ctx = AttnContext(cos=cos, sin=sin)
    x = torch.randn(2, 32, 64)
    outs = []
    for fn in (block, torch.compile(block, backend="aot_eager")):
        xi = x.clone().requires_grad_()
        y = fn(xi, ctx)
        y.square().mean().backward()
        outs.append((y.detach(), xi.grad, block.mlp.down_proj.weight.grad.clone()))
        block.zero_grad()
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-2, rel(a, b)


def _graph_backend(graphs: dict):
    """A torch.compile backend with the partitioner inductor uses, keeping the forward and backward
    graphs in graphs['fw'] / graphs['bw'] for inspection."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=capture("fw"), bw_compiler=capture("bw"),
                                     partition_fn=min_cut_rematerialization_partition)
    return backend


def _calls(gm, op) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]


def test_split_transpose_same_numbers_saved_from_the_forward():
    graphs = {}
    backend = _graph_backend(graphs)
    torch.manual_seed(0)
    block = TransformerBlock(64, 4, 2, 16, 128)
    cos, sin = rope_tables(torch.arange(32)[None], 16, 10000.0)
    ctx, x = AttnContext(cos=cos, sin=sin), torch.randn(2, 32, 64)
    outs = []
    for split_t, compiled in ((False, False), (True, False), (True, True)):
        blk = copy.deepcopy(block)
        n_fp8 = len(apply_fp8(blk, min_dim=64, where=lambda name, mod: True, split_t=split_t))
        fn = torch.compile(blk, backend=backend) if compiled else blk
        xi = x.clone().requires_grad_()
        y = fn(xi, ctx)
        y.square().mean().backward()
        outs.append([y.detach(), xi.grad, *(p.grad for p in blk.parameters())])
    for ref, got in zip(outs[0], outs[1]):  # eager: the same FP8 values, only their layout differs
        assert torch.equal(ref, got)
    for ref, got in zip(outs[0], outs[2]):  # compiled: the same math (aot_eager-level graphs)
        assert rel(got, ref) < 1e-5, rel(got, ref)
    (fw,), (bw,) = graphs["fw"], graphs["bw"]
    calls = _calls
    t_nodes = calls(fw, torch.ops.megaflow.fp8_transpose.default)
    assert n_fp8 == 4 and len(t_nodes) == n_fp8

    def base(n):  # through transposes to the tensor they view
        return base(n.args[0]) if n.op == "call_function" and n.target == torch.ops.aten.t.default else n
    saved = {base(n) for n in next(n for n in fw.graph.nodes if n.op == "output").args[0] if n is not None}
    assert set(t_nodes) <= saved  # each copy goes to the backward as it is
    assert not calls(bw, torch.ops.megaflow.fp8_transpose.default)
    # the forward writes no transposed FP8 copy of its own (the only clones left are the backward's:
    # W^T and dy^T)
    assert not [n for n in calls(fw, torch.ops.aten.clone.default) if n.meta["val"].dtype == torch.float8_e4m3fn]


def test_one_read_cast_same_bytes_both_layouts_from_the_forward():
    """parallel.fp8_one_read: x, W and dy cast in both layouts by megaflow::fp8_cast_t give the block's
    outputs and gradients bit for bit (eager; compiled within float rounding of eager); compiled, the
    forward graph casts x and W by it (2 per FP8 linear), the backward dy (1 per linear) and makes no
    transposed FP8 copy of its own (W's comes from the forward)."""
    from megaflow.fp8_kernels import E5M2, fp8_cast, fp8_cast_t
    t, scale = torch.randn(48, 80).bfloat16(), torch.tensor(7.5)
    q, qt = fp8_cast_t(t, scale, True)
    assert q.dtype == E5M2 and torch.equal(q, fp8_cast(t, scale, E5M2)) and torch.equal(qt, q.t())
    graphs = {}
    torch.manual_seed(0)
    block = TransformerBlock(64, 4, 2, 16, 128)
    cos, sin = rope_tables(torch.arange(32)[None], 16, 10000.0)
    ctx, x = AttnContext(cos=cos, sin=sin), torch.randn(2, 32, 64)
    outs, blks = [], []
    for one_read, compiled in (((), False), (("w", "dy"), False), (("xo", "w", "dy"), False),
                               (("x", "w", "dy"), False), (("x", "w", "dy"), True)):
        blk = copy.deepcopy(block)
        assert len(apply_fp8(blk, min_dim=64, where=lambda n, m: True, split_t=True, one_read=one_read)) == 4
        blks.append(blk)
        fn = torch.compile(blk, backend=_graph_backend(graphs)) if compiled else blk
        xi = x.clone().requires_grad_()
        y = fn(xi, ctx)
        y.square().mean().backward()
        outs.append([y.detach(), xi.grad, *(p.grad for p in blk.parameters())])
    for got in outs[1:4]:
        for ref, g in zip(outs[0], got):
            assert torch.equal(ref, g)
    for ref, g in zip(outs[0], outs[4]):
        assert rel(g, ref) < 1e-5, rel(g, ref)
    (fw,), (bw,) = graphs["fw"], graphs["bw"]
    op = torch.ops.megaflow.fp8_cast_t.default
    assert len(_calls(fw, op)) == 8 and len(_calls(bw, op)) == 4
    assert not _calls(fw, torch.ops.megaflow.fp8_transpose.default)
    xo = blks[2]  # 'xo': x by one read in the output projections only
    assert xo.self_attn.o_proj.one_read == ("w", "dy", "x") == xo.mlp.down_proj.one_read
    assert xo.self_attn.qkv.one_read == ("w", "dy") == xo.mlp.gate_up.one_read
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    assert not [n for g in (fw, bw) for n in _calls(g, torch.ops.aten.clone.default) if n.meta["val"].dtype in fp8]


def _block_steps(block, xs, ctx, compile_backend=None, micro: bool = False) -> list:
    """(y, dx) of each input of `xs` through `block` (its weights fixed, so only the scaling differs
    between calls); `micro`: the inputs in pairs, both forwards before the two backwards."""
    fn = torch.compile(block, backend=compile_backend, fullgraph=True) if compile_backend else block
    out, pending = [], []
    for x in xs:
        xi = x.clone().requires_grad_()
        pending.append((xi, fn(xi, ctx)))
        if not micro or len(pending) == 2:
            for xi, y in pending:
                y.square().mean().backward()
                out.append((y.detach(), xi.grad))
            pending = []
    return out


def test_delayed_scaling_tracks_current_compiles_and_resumes():
    torch.manual_seed(0)
    block = TransformerBlock(64, 4, 2, 16, 128)
    cos, sin = rope_tables(torch.arange(32)[None], 16, 10000.0)
    ctx = AttnContext(cos=cos, sin=sin)
    xs = [torch.randn(2, 32, 64) * (1 + i / 4) for i in range(4)]  # growing amaxes: delayed scales lag
    runs, blocks = {}, {}
    for name, delayed, backend, micro in (("current", False, None, False), ("delayed", True, None, False),
                                          ("aot_eager", True, "aot_eager", False), ("micro", True, None, True),
                                          ("one_read", True, None, False)):
        blocks[name] = blk = copy.deepcopy(block)
        assert len(apply_fp8(blk, min_dim=64, where=lambda n, m: True, delayed=delayed, split_t=True,
                             one_read=("x", "w", "dy") if name == "one_read" else ())) == 4
        runs[name] = _block_steps(blk, xs, ctx, backend, micro)
    for got, ref in zip(runs["one_read"], runs["delayed"]):  # the one-read casts scale by the history too
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for got, ref in zip(runs["delayed"][0], runs["current"][0]):  # the first call: current scaling exactly
        assert torch.equal(got, ref)
    for (y, dx), (yr, dxr) in zip(runs["delayed"][1:], runs["current"][1:]):
        assert 1e-4 < rel(y, yr) < 0.03 and 1e-4 < rel(dx, dxr) < 0.08, (rel(y, yr), rel(dx, dxr))
    for name in ("aot_eager", "micro"):  # compiled, and with micro-batches: delayed scaling's own numbers
        for got, ref in zip(runs[name], runs["delayed"]):
            assert rel(got[0], ref[0]) < 1e-5 and rel(got[1], ref[1]) < 1e-5, name
    hist = blocks["delayed"].mlp.gate_up.fp8_amax_history  # (3, 16): x, W, dy; the last 4 calls at the end
    assert hist.shape == (3, 16) and hist.dtype == torch.float32
    assert (hist[:, :-4] == 0).all() and (hist[:, -4:] > 0).all()
    assert torch.equal(hist[1, -4:], blocks["delayed"].mlp.gate_up.weight.abs().amax().expand(4))
    assert fp8_state(blocks["current"]) == {}
    off = copy.deepcopy(blocks["delayed"])  # parallel.fp8_start_step: before it the bf16 GEMMs, history untouched
    set_fp8_on(off, False)
    for got, ref in zip(_block_steps(off, xs[:1], ctx)[0], _block_steps(copy.deepcopy(block), xs[:1], ctx)[0]):
        assert torch.equal(got, ref)
    assert torch.equal(off.mlp.gate_up.fp8_amax_history, hist)
    saved = fp8_state(blocks["delayed"])
    assert sorted(saved) == ["mlp.down_proj", "mlp.gate_up", "self_attn.o_proj", "self_attn.qkv"]
    resumed = copy.deepcopy(block)
    apply_fp8(resumed, min_dim=64, where=lambda n, m: True, delayed=True, split_t=True)
    cast = copy.deepcopy(resumed)
    cast_params(cast, torch.bfloat16)  # bf16 parameters (train.param_dtype=bf16): the histories stay fp32
    assert cast.mlp.gate_up.weight.dtype == torch.bfloat16 and cast.mlp.gate_up.fp8_amax_history.dtype == torch.float32
    assert load_fp8_state(resumed, saved) == 4
    x5 = [torch.randn(2, 32, 64) * 2]
    for got, ref in zip(_block_steps(resumed, x5, ctx)[0], _block_steps(blocks["delayed"], x5, ctx)[0]):
        assert torch.equal(got, ref)  # the resumed layer scales as the uninterrupted one


def test_pipeline_engine_with_torch_fp8(monkeypatch, caplog):
    import megaflow.fp8
    from parallel.runtime import build_engine, build_stages
    from parallel.topology import ParallelConfig, Topology
    from tests.train.test_fast_step import run_config
    monkeypatch.setattr(megaflow.fp8, "check_fp8_device", lambda device: None)  # the CPU stands in for the GPU
    cfg = dataclasses.replace(tiny_config(), stage="all")
    ref = build_model(cfg, "cpu", seed=0)
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    noise = make_noise(cfg, batch)
    losses = {}
    caplog.set_level(logging.INFO, logger="megaflow")
    expect = {"off": (0, ""),  # current: 4 VLM + 2 flow blocks x 4 linears (not the shallow ones)
              "current": (24, "FP8 (torch._scaled_mm, current scaling): 24 block linears of both dimensions >= 32"),
              "delayed": (16, "FP8 (torch._scaled_mm, delayed scaling): 16 block linears of both dimensions >= 32, "
                              "the first and last 1 VLM blocks in bf16")}  # VLM blocks 0 and 3 stay bf16
    for fp8, (n, msg) in expect.items():
        run = dataclasses.replace(run_config(), model=cfg, parallel=ParallelConfig(
            fp8=fp8, fp8_backend="torch", fp8_min_dim=32, micro_batches=2, fp8_split_transpose=True,
            fp8_bf16_ends=1 if fp8 == "delayed" else 0, fp8_one_read="xo+w+dy" if fp8 == "current" else ""))
        model, stages, tied = build_stages(cfg, run.parallel, Topology(), torch.device("cpu"), 0,
                                           full_state=ref.state_dict(), seq_len=48)
        fp8_names = [n for st in stages for n, m in st.module.named_modules() if isinstance(m, Float8Linear)]
        assert len(fp8_names) == n, fp8_names
        assert fp8 != "delayed" or not any(n.startswith(("units.0.vlm_layers.0.", "units.1.vlm_layers.1."))
                                           for n in fp8_names)
        assert all(m.split_t for st in stages for m in st.module.modules() if isinstance(m, Float8Linear))
        assert all(("w" in m.one_read) == (fp8 == "current") for st in stages for m in st.module.modules()
                   if isinstance(m, Float8Linear))  # parallel.fp8_one_read reaches the stages' layers
        said = [r.getMessage() for r in caplog.records if "FP8 (torch._scaled_mm" in r.getMessage()]
        assert said == ([msg] if msg else []), said
        caplog.clear()
        engine = build_engine(run, model, stages, tied, Topology(), None)
        if fp8 == "delayed":  # parallel.fp8_start_step's switch reaches the stages' layers through the model
            set_fp8_on(model, False)
            losses[fp8] = [float(engine.train_step(batch, noise, None, 1e-3)["loss"])]
            assert losses[fp8] == losses["off"][:1]  # bf16 GEMMs: the bf16 step exactly
            set_fp8_on(model, True)
            losses[fp8].append(float(engine.train_step(batch, noise, None, 1e-3)["loss"]))
        else:
            losses[fp8] = [float(engine.train_step(batch, noise, None, 1e-3)["loss"]) for _ in range(2)]
    for fp8 in ("current", "delayed"):
        for a, b in zip(losses[fp8], losses["off"]):
            assert abs(a - b) < 0.02 * abs(b), losses
        assert losses[fp8] != losses["off"]


def test_bad_fp8_configs_are_refused(tmp_path):
    from megaflow.config import ConfigError
    from megaflow.train import run
    from parallel.runtime import check_layout
    from parallel.topology import ParallelConfig
    from tests.train.test_fast_step import run_config
    with pytest.raises(ValueError, match="set parallel.backend=local"):
        ParallelConfig(backend="te", fp8="current", fp8_backend="torch")
    with pytest.raises(ValueError, match="fp8_bf16_ends=-1 must be >= 0"):
        ParallelConfig(fp8="delayed", fp8_backend="torch", fp8_bf16_ends=-1)
    with pytest.raises(ValueError, match="fp8_backend=torch"):
        ParallelConfig(fp8="current")  # Transformer Engine's FP8 without its layers: says both ways out
    assert ParallelConfig(fp8="current", fp8_backend="torch").te_fp8 == "off"
    check_layout(ParallelConfig(tp=2, fp8="current", fp8_backend="torch"), 2, tiny_config())  # served since session 7
    with pytest.raises(ValueError, match="set async_tp=false"):  # its overlapped GEMMs would silently stay bf16
        ParallelConfig(tp=2, sequence_parallel=True, async_tp=True, fp8="current", fp8_backend="torch")
    with pytest.raises(ValueError, match="set async_tp=false"):  # without SP too: copy_linear's GEMMs are bf16
        ParallelConfig(tp=2, async_tp=True, fp8="current", fp8_backend="torch")
    cfg = run_config(device="cpu", out_dir=str(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(fp8="current", fp8_backend="torch"))
    with pytest.raises(ConfigError, match="CUDA GPU"):
        run(cfg)
    with pytest.raises(ValueError, match=r"\['wt'\] not among 'x', 'xo', 'w', 'dy'"):
        ParallelConfig(fp8="current", fp8_backend="torch", fp8_one_read="x,wt")
    assert ParallelConfig(fp8="current", fp8_backend="torch", fp8_one_read=" w+dy").fp8_one_read_operands == ("w", "dy")
    with pytest.raises(ValueError, match="fp8_start_step=-1 must be >= 0"):
        ParallelConfig(fp8="current", fp8_backend="torch", fp8_start_step=-1)
    late = dataclasses.replace(cfg, parallel=ParallelConfig(fp8="delayed", fp8_backend="torch", fp8_start_step=20),
                               train=dataclasses.replace(cfg.train, step_graph="auto"))
    with pytest.raises(ConfigError, match="set train.step_graph=off"):  # a captured graph would keep bf16
        run(late)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def _tp_fp8_worker(rank, world):
    """Per layout: (loss, its relative difference to the fp32 and to the FP8 single-process model,
    the same for the gathered gradients, the number of parallel layers with an FP8 GEMM)."""
    import megaflow.fp8
    from parallel.checkpoint_tp import gather_full_grads
    from parallel.runtime import build_stages
    from parallel.topology import ParallelConfig, Topology
    from tests.parallel.test_tp import reference
    megaflow.fp8.check_fp8_device = lambda device: None  # the CPU stands in for the GPU
    cfg, ref = reference()
    ref8 = copy.deepcopy(ref)
    apply_fp8(ref8, min_dim=32)
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    noise = make_noise(cfg, batch)
    names = sorted(n for n, p in ref.named_parameters() if p.requires_grad)
    flat = lambda g: torch.cat([g[n].flatten() for n in names])  # noqa: E731
    singles = {}
    for name, model in (("fp32", ref), ("fp8", ref8)):
        loss = model(batch, noise)[0]
        loss.backward()
        singles[name] = (loss.detach(), flat({n: p.grad for n, p in model.named_parameters()}))
    out = {}
    for sp in (False, True):
        pcfg = ParallelConfig(tp=2, sequence_parallel=sp, fp8="delayed" if sp else "current", fp8_backend="torch",
                              fp8_min_dim=32,  # delayed scaling's first step is current scaling's
                              fp8_one_read="" if sp else "xo+w+dy")  # the one-read casts: the same bytes
        model, _, _ = build_stages(cfg, pcfg, Topology(tp=2), torch.device("cpu"), 0, full_state=ref.state_dict(),
                                   seq_len=48)
        n_fp8 = sum(isinstance(getattr(m, "linear", None), functools.partial) for m in model.modules())
        one_read = {tuple(sorted(m.linear.keywords["one_read"])) for m in model.modules()
                    if isinstance(getattr(m, "linear", None), functools.partial)}
        loss = model(batch, noise)[0]
        loss.backward()
        grads = gather_full_grads(model)
        hists = [m.fp8_amax_history for m in model.modules() if hasattr(m, "fp8_amax_history")]
        out[sp] = dict(n_fp8=n_fp8, names_match=set(grads) >= set(names), n_hist=len(hists), one_read=one_read,
                       filled=all(bool((h[:, -1] > 0).all()) for h in hists), **{
            f"{k}_{name}": rel(v, ref_v) for name, (ref_loss, ref_grad) in singles.items()
            for k, v, ref_v in (("loss", loss, ref_loss), ("grad", flat(grads), ref_grad))})
    return out


def test_tp2_with_torch_fp8():
    """Float8's GEMM composes with our column/row-parallel layers (module docstring)."""
    from tests.distributed import run_distributed
    for sp, r in run_distributed(_tp_fp8_worker, 2)[0].items():
        assert r["n_fp8"] == 24, r  # 4 VLM + 2 flow blocks x 4 linears; not the width-16 shallow flows
        assert r["n_hist"] == (24 if sp else 0) and r["filled"], r  # delayed (with SP): x, W, dy amaxes recorded
        assert r["names_match"], r
        # parallel.fp8_one_read reaches the parallel layers ('xo': x by one read in o_proj / down_proj only)
        assert r["one_read"] == ({()} if sp else {("dy", "w"), ("dy", "w", "x")}), r
        assert 1e-4 < r["loss_fp32"] < 0.02 and r["loss_fp8"] < 0.02, (sp, r)  # FP8 rounding, not bf16-exact
        assert 1e-3 < r["grad_fp32"] < 0.12 and r["grad_fp8"] < 0.15, (sp, r)  # e5m2 gradients: ~7-9%


FP8_ON_CPU = """
import sys
import megaflow.fp8, megaflow.train as T
megaflow.fp8.check_fp8_device = lambda device: None  # the CPU stands in for the GPU
sys.exit(T.main(sys.argv[1:]))
"""


def test_delayed_scaling_resumes_exactly_through_megaflow_train(tiny_sets, tmp_path):
    """Contract: `megaflow train` with delayed FP8 scaling keeps every FP8 layer's amax history in the
    checkpoint (trainer.pt "fp8"); 4 steps in one go and 2 steps + `--resume` to 4 end with the same
    weights bit for bit (a resume that restarted the histories would scale step 3 afresh)."""
    from tests.forked import run_python
    from tests.train.conftest import REPO, run_env, train_args
    sets = ["train.steps=4", "train.save_every=2", "train.keep_last=5", "train.eval_data=", "parallel.fp8=delayed",
            "parallel.fp8_backend=torch", "parallel.fp8_min_dim=32", "train.threads=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, more in ((whole, []), (split, ["train.steps=2"])):
        res = run_python(["-c", FP8_ON_CPU, *train_args(tiny_sets, out, *sets, *more)[1:]], REPO, run_env())
        assert res.returncode == 0, res.stderr[-2000:]
    res = run_python(["-c", FP8_ON_CPU, *train_args(tiny_sets, split, *sets)[1:], "--resume"], REPO, run_env())
    assert res.returncode == 0 and "step_000002 at step 2" in res.stderr, res.stderr[-2000:]
    a, b = (torch.load(d / "checkpoints" / "step_000004" / f, map_location="cpu", weights_only=False)
            for d in (whole, split) for f in ("model.pt",))
    saved = torch.load(split / "checkpoints" / "step_000002" / "trainer.pt", weights_only=False)["fp8"]
    assert len(saved) == 16, sorted(saved)  # 2 VLM + 2 flow blocks x 4 linears
    assert all(h.shape == (3, 16) and (h[:2, -2:] > 0).all() and (h[:, :-2] == 0).all() for h in saved.values())
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ"
