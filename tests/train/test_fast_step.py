"""The fast training step (issue 13) keeps the numbers.

- bf16 parameters with fp32 main weights train a tiny model to the same held-out bits/dim as fp32
  (within 0.01), the optimizer steps fp32 copies, and what a checkpoint saves is those fp32 weights;
- the step returns device tensors (no read-back inside it); metrics are read at log steps;
- activation checkpointing (selective, full) and per-block compilation give eager's loss and
  gradients (compiled with the aot_eager backend on CPU: the same graph capture and autograd
  as inductor, without its C++ build, which takes ~40 s per block shape on two cores);
- flow.shallow_ffn_dim sizes the shallow blocks' MLP;
- the pipeline engine's mixed precision (PP=2 on gloo) follows the one-process bf16 run.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megaflow.config import load_config
from megaflow.model.starflow import bits_per_dim, build_model
from megaflow.optim import MainWeights, lr_at, param_groups, set_lr
from megaflow.speed import apply_ac, apply_compile, transformer_blocks
from megaflow.train import PlainEngine, read_metrics
from tests.helpers import make_batch, make_noise, tiny_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def smooth_images(batch: dict, seed: int) -> dict:
    """Learnable images: per-image linear ramps on 8-bit levels (uniform noise would stay at ~8 bpd)."""
    g = torch.Generator().manual_seed(seed)
    B, M, C, H, W = batch["images"].shape
    a, b = torch.rand(2, B, M, 1, 1, 1, generator=g) * 2 - 1
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    img = (0.6 * a * x + 0.4 * b * y).clamp(-1, 1)
    img = torch.round((img + 1) * 127.5) / 127.5 - 1
    return {**batch, "images": img * batch["image_valid"][..., None, None, None]}


def run_config(**train):
    cfg = load_config(str(TINY))
    return dataclasses.replace(cfg, model=tiny_config(),
                               train=dataclasses.replace(cfg.train, compile="off", **train))


def heldout_bpd(model, batches) -> float:
    flow, dims = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        for batch, noise in batches:
            terms = model.terms(batch, noise)
            flow += float(terms["flow_sum"])
            dims += int(model.loss_counts(batch)["dims"])
    return bits_per_dim(flow / dims, True)


def train_tiny(param_dtype: str, steps: int = 40, lr: float = 1e-3, **train):
    """A tiny model trained on smooth images (warm-up + cosine); returns (engine, the last step's
    output, held-out bits/dim of an fp32 model loaded from what a checkpoint would save)."""
    cfg = run_config(lr=lr, grad_clip=1.0, dtype="bf16" if param_dtype == "bf16" else "fp32",
                     param_dtype=param_dtype, **train)
    model = build_model(cfg.model, seed=0)
    engine = PlainEngine(model, cfg, torch.bfloat16 if param_dtype == "bf16" else None)
    for s in range(steps):
        batch = smooth_images(make_batch(cfg.model, batch_size=4, seed=s % 8), seed=s % 8)
        out = engine.train_step(batch, make_noise(cfg.model, batch, seed=100 + s), None,
                                lr_at(s, lr, lr / 10, 5, steps))
    held = [(smooth_images(make_batch(cfg.model, batch_size=4, seed=50 + i), seed=50 + i), None) for i in range(4)]
    fp32 = build_model(cfg.model, seed=0)
    fp32.load_state_dict(engine.model_state_dict())
    return engine, out, heldout_bpd(fp32, held)


def test_bf16_params_train_like_fp32():
    """bf16 parameters + fp32 main weights: same held-out bits/dim as fp32 within 0.01; the model's
    weights are bf16, the optimizer's and the checkpoint's fp32, and the step returns tensors."""
    e32, out32, bpd32 = train_tiny("fp32")
    e16, out16, bpd16 = train_tiny("bf16")
    init = heldout_bpd(build_model(tiny_config(), seed=0),
                       [(smooth_images(make_batch(tiny_config(), batch_size=4, seed=50 + i), seed=50 + i), None)
                        for i in range(4)])
    assert bpd32 < init - 0.5, f"the tiny model did not learn (bits/dim {init:.3f} -> {bpd32:.3f})"
    assert abs(bpd16 - bpd32) < 0.01, f"bf16 {bpd16:.4f} vs fp32 {bpd32:.4f} bits/dim"
    weights = {p.dtype for n, p in e16.model.named_parameters() if not n.startswith("fae.")}
    assert weights == {torch.bfloat16}
    assert {p.dtype for p in e16.params} == {torch.float32} and e16.optimizer.param_groups[0]["params"][0] is e16.params[0]
    assert {v.dtype for v in e16.model_state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert e16.weights.flat_param.numel() == sum(p.numel() for p in e16.params)  # one flat buffer of bf16 weights
    for out in (out32, out16):  # no read-back inside the step
        assert torch.is_tensor(out["loss"]) and torch.is_tensor(out["grad_norm"])
        read = read_metrics(out)
        assert isinstance(read["loss"], float) and math.isfinite(read["bits_per_dim"])


def test_main_weights_fp32_is_plain_adamw():
    """param_dtype fp32: MainWeights steps the parameters themselves, exactly torch's AdamW."""
    cfg = run_config()
    a, b = build_model(cfg.model, seed=0), build_model(cfg.model, seed=0)
    mw = MainWeights(a, param_groups(a, 0.05), cfg.train)
    ref = torch.optim.AdamW(param_groups(b, 0.05), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
    batch = make_batch(cfg.model)
    for model, step in ((a, mw.step), (b, ref.step)):
        model(batch, make_noise(cfg.model, batch))[0].backward()
        step()
    assert {id(p) for p in mw.params} == {id(p) for p in a.parameters() if p.requires_grad}
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("fused", [False, True])
def test_step_if_finite_skips_nonfinite_gradients_without_touching_state(fused):
    """A NaN gradient norm leaves bf16 weights, fp32 main weights, AdamW's moments and its step count
    untouched; the fused kernel (CUDA's, run here on CPU) decides on the device through found_inf,
    the foreach path on the host. A finite norm steps exactly as step() does."""
    cfg = run_config()
    a, b = build_model(cfg.model, seed=0), build_model(cfg.model, seed=0)
    mw = MainWeights(a, param_groups(a, 0.05), cfg.train, torch.bfloat16, fused=fused)
    ref = MainWeights(b, param_groups(b, 0.05), cfg.train, torch.bfloat16, fused=fused)
    batch = make_batch(cfg.model)
    for model, w in ((a, mw), (b, ref)):
        w.zero_grad()
        model(batch, make_noise(cfg.model, batch))[0].float().backward()
        w.grads_to_main()
    assert float(mw.step_if_finite(torch.tensor(1.0))) == 0.0
    ref.step()
    for p, q in zip(mw.params, ref.params):
        assert torch.equal(p, q)
    state = ({id(p): {k: v.clone() for k, v in s.items()} for p, s in mw.optimizer.state.items()},
             [p.clone() for p in mw.params], [p.clone() for p in a.parameters()])
    for p in mw.params:
        p.grad = torch.full_like(p, float("nan"))
    assert float(mw.step_if_finite(torch.tensor(float("nan")))) == 1.0
    assert all(torch.equal(p, q) for p, q in zip(mw.params, state[1]))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), state[2]))
    for p, s in mw.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[0][id(p)][k]), k
    mw.zero_grad()  # and training goes on after a skip: the gradient buffers are still attached
    a(batch, make_noise(cfg.model, batch))[0].float().backward()
    mw.grads_to_main()
    assert float(mw.step_if_finite(torch.tensor(1.0))) == 0.0
    assert not all(torch.equal(p, q) for p, q in zip(mw.params, state[1]))


def loss_and_grads(model, batch, noise):
    model.zero_grad(set_to_none=True)
    loss, _ = model(batch, noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["ac_full", "ac_selective", "compile", "compile_ac_full", "compile_unit_ac_selective"])
def test_speedups_equal_eager(mode):
    """Activation checkpointing and regional compilation (per block with the shallow blocks' affine
    maps and the losses as regions of their own, or per Pretzel unit and shallow coupling with the
    blocks' checkpointing inside): eager's loss and gradients; evaluation and generation (no grad,
    or a KV cache) bypass both."""
    cfg = tiny_config()
    batch, noise = make_batch(cfg), make_noise(cfg, make_batch(cfg))
    ref = build_model(cfg, seed=0)
    model = build_model(cfg, seed=0)
    if mode.startswith("compile"):
        torch._dynamo.reset()
    if "full" in mode or "selective" in mode:
        assert apply_ac(model, "full" if "full" in mode else "selective") == len(transformer_blocks(model))
    if mode.startswith("compile_unit"):
        regions = len(model.units) + len(model.shallow.blocks) + 1  # + the heads and losses
        assert apply_compile(model, backend="aot_eager", scope="unit") == regions
    elif mode.startswith("compile"):  # every block, every shallow block's affine map, the heads + losses
        regions = len(transformer_blocks(model)) + len(model.shallow.blocks) + 1
        assert apply_compile(model, backend="aot_eager") == regions
    loss_ref, grads_ref = loss_and_grads(ref, batch, noise)
    loss, grads = loss_and_grads(model, batch, noise)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(model(batch, noise)[0], loss_ref, rtol=1e-5, atol=1e-6)


def test_scatter_images_is_masked_scatter():
    """The embed's sync-free scatter of image latents equals masked_scatter(values[valid]), also
    when a row's valid images are not its first ones."""
    from megaflow.model.starflow import scatter_images
    cfg = tiny_config()
    batch = make_batch(cfg, batch_size=3, max_images=2)
    valid, mask = batch["image_valid"].clone(), batch["image_mask"]
    valid[1] = torch.tensor([False, True])  # row 1's one image is held in slot 1
    values = torch.randn(3, 2, cfg.fae.n_tokens, cfg.fae.latent_dim)
    want = torch.zeros(3, mask.shape[1], cfg.fae.latent_dim).masked_scatter(mask[..., None], values[valid])
    assert torch.equal(scatter_images(values, valid, mask), want)


def test_shallow_ffn_dim():
    """flow.shallow_ffn_dim sets the shallow blocks' SwiGLU size (0 keeps 4 x shallow_dim)."""
    default = build_model(tiny_config(), seed=0)
    sized = build_model(tiny_config(shallow_ffn_dim=24), seed=0)
    assert default.shallow.blocks[0].layers[0].mlp.gate_up.out_features == 2 * 4 * 16  # [gate; up]
    assert sized.shallow.blocks[0].layers[0].mlp.gate_up.out_features == 2 * 24
    with pytest.raises(ValueError, match="shallow_ffn_dim"):
        tiny_config(shallow_ffn_dim=-1)


def _pp2_bf16(rank, world):
    """PP=2 (2 micro-batches, tied embeddings) with bf16 weights vs one process with bf16 weights,
    both with full activation checkpointing (its recompute inside a pipeline stage)."""
    from parallel.engine import ParallelEngine
    from parallel.pipeline import TiedEmbeddings, load_stages, split_stages
    from parallel.topology import Topology
    from tests.parallel.test_pp_dist import _config
    from megaflow.model.starflow import STARFlow2, apply_stage
    mcfg = _config(4, tie=True)
    cfg = run_config(dtype="bf16", param_dtype="bf16", activation_checkpointing="full")
    cfg = dataclasses.replace(cfg, model=mcfg, parallel=dataclasses.replace(cfg.parallel, pp=2, micro_batches=2))
    batch = make_batch(mcfg, 4, 48)
    noise = make_noise(mcfg, batch)
    one = PlainEngine(build_model(mcfg, seed=0), cfg, torch.bfloat16)
    state = one.model_state_dict()
    topo = Topology(pp=2)
    with torch.device("meta"):
        model = STARFlow2(mcfg)
    apply_stage(model, mcfg.stage)
    stages = split_stages(model, 2, topo.pp_rank, "1f1b", 1, 2, verbose=False)
    load_stages(stages, state)
    tied = TiedEmbeddings(stages, topo)
    engine = ParallelEngine(stages, cfg, torch.bfloat16, topo, tied)
    assert all(b.ac_mode == "full" for st in stages for b in transformer_blocks(st.module))
    out = {"dtypes": sorted({str(p.dtype) for st in stages for p in st.module.parameters()}),
           "main": sorted({str(p.dtype) for p in engine.params}), "loss": [], "ref": []}
    for _ in range(3):
        out["loss"].append(engine.train_step(batch, noise, None, 1e-3)["loss"])
        out["ref"].append(float(one.train_step(batch, noise, None, 1e-3)["loss"]))
    mine, ref = engine.model_state_dict(), one.model_state_dict()
    diff = sum(float((v - ref[k]).pow(2).sum()) for k, v in mine.items() if v.is_floating_point())
    moved = sum(float((v - state[k]).pow(2).sum()) for k, v in mine.items() if v.is_floating_point())
    out["update_mismatch"] = (diff / moved) ** 0.5  # |pipeline - one process| / |one step's update|
    out["fp32_state"] = all(v.dtype == torch.float32 for v in mine.values() if v.is_floating_point())
    return out


def test_pipeline_engine_bf16_weights_match_one_process():
    """The pipeline engine's mixed precision (bf16 stage weights, fp32 main weights fed by gradient
    hooks across 2 micro-batches, the tied embedding's gradient summed in fp32, fp32 flow variables
    sent between stages, blocks checkpointed) follows the one-process bf16 run within bf16 rounding
    for 3 steps."""
    from tests.distributed import run_distributed
    for out in run_distributed(_pp2_bf16, 2):
        assert out["dtypes"] == ["torch.bfloat16"] and out["main"] == ["torch.float32"] and out["fp32_state"]
        for got, want in zip(out["loss"], out["ref"]):
            assert abs(got - want) < 1e-3 * max(1.0, abs(want)), (out["loss"], out["ref"])
        assert out["update_mismatch"] < 0.05, out["update_mismatch"]  # measured 0.011


def test_step_metrics_leave_out_what_was_not_counted_and_keep_a_nan_loss():
    """The training step's metric tensors (megaflow.model.starflow.metric_tensors, nothing read
    back) and the floats of metrics_from are one computation: a batch without text targets has no
    text_loss, one without images no flow_nll / bits_per_dim, and a NaN flow term IS reported
    (NaN), never dropped as if nothing had been counted."""
    from megaflow.model.starflow import metric_tensors, metrics_from
    cfg = tiny_config()
    terms = {"flow_sum": torch.tensor(float("nan")), "text_sum": torch.tensor(6.0)}
    counts = {"dims": torch.tensor(12), "text": torch.tensor(0)}
    tensors = metric_tensors(terms, counts, cfg)
    assert all(torch.is_tensor(v) for v in tensors.values())
    for read in (read_metrics(tensors), metrics_from(terms, counts, cfg)):
        assert read.keys() == {"flow_nll", "bits_per_dim"} and math.isnan(read["flow_nll"]), read
    terms = {"flow_sum": torch.tensor(0.0), "text_sum": torch.tensor(6.0)}
    counts = {"dims": torch.tensor(0), "text": torch.tensor(3)}
    assert metrics_from(terms, counts, cfg) == read_metrics(metric_tensors(terms, counts, cfg)) == {"text_loss": 2.0}

@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_clip_in_fused_adamw_equals_clip_grad_norm(max_norm):
    """MainWeights.clip_and_step: the fused AdamW applies clip_grad_norm_'s clipping as its
    grad_scale (no separate pass over the gradients); its moments, weights and gradients equal
    torch's clip_grad_norm_ followed by the foreach AdamW, and the clipping really applied (the
    moments differ from an unclipped step's). max_norm 0: no clipping."""
    cfg = run_config()
    batch = make_batch(cfg.model)
    noise = make_noise(cfg.model, batch)
    runs = {}
    for way in ("fused", "reference", "unclipped"):
        model = build_model(cfg.model, seed=0)
        w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=way == "fused")
        w.zero_grad()
        model(batch, noise)[0].float().backward()
        w.grads_to_main()
        if way == "fused":
            norm, skipped = w.clip_and_step(max_norm)
            assert float(skipped) == 0.0
        else:
            norm = torch.nn.utils.clip_grad_norm_(w.params, max_norm if way == "reference" and max_norm > 0
                                                  else float("inf"))
            w.step()
        runs[way] = (w, norm)
    (fused, n_fused), (ref, n_ref) = runs["fused"], runs["reference"]
    torch.testing.assert_close(n_fused, n_ref, rtol=1e-5, atol=0)
    assert float(n_ref) > 1e-2  # so max_norm 1e-3 clips
    for p, q, u in zip(fused.params, ref.params, runs["unclipped"][0].params):
        sp, sq, su = fused.optimizer.state[p], ref.optimizer.state[q], runs["unclipped"][0].optimizer.state[u]
        torch.testing.assert_close(sp["exp_avg"], sq["exp_avg"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        if max_norm > 0 and su["exp_avg"].abs().max() > 0:
            assert not torch.allclose(sp["exp_avg"], su["exp_avg"])


def _tp2_compiled(rank, world, halves: bool = False):
    """TP=2 with sequence parallelism and async TP (inside compiled graphs the layers emit the plain
    collectives that inductor fuses on NCCL), compiled Pretzel units and shallow couplings with
    selective checkpointing inside (collectives inside the graphs), vs the eager one-process engine.
    `halves`: plain TP with async TP and parallel.tp_overlap (batch halves, deferred all-reduces) instead."""
    import megaflow.speed
    from parallel.runtime import build_engine, build_stages
    from parallel.topology import Topology
    from tests.parallel.test_tp import reference
    megaflow.speed.BACKEND = "aot_eager"  # dynamo's capture and AOTAutograd as inductor, without its C++ build
    mcfg, ref = reference()
    cfg = run_config(activation_checkpointing="none" if halves else "selective")  # halves: as h200_1b runs
    cfg = dataclasses.replace(cfg, model=mcfg, train=dataclasses.replace(cfg.train, compile="on"),
                              parallel=dataclasses.replace(cfg.parallel, tp=2, sequence_parallel=not halves, async_tp=True,
                                                           tp_overlap=2 if halves else 0))
    model, stages, tied = build_stages(mcfg, cfg.parallel, Topology(tp=2), torch.device("cpu"), 0,
                                       full_state=ref.state_dict(), seq_len=48)
    engine = build_engine(cfg, model, stages, tied, Topology(tp=2), None)
    one = PlainEngine(ref, run_config(), None)
    batch = make_batch(mcfg, batch_size=2, seq_len=48)
    noise = make_noise(mcfg, batch)
    from torch._dynamo.utils import counters

    from megaflow.model.masks import use_kernel
    counters.clear()
    with use_kernel("flex" if halves else "auto"):  # halves: the BlockMask split per chunk inside the compiled unit
        losses = [(engine.train_step(batch, noise, None, 1e-3)["loss"],
                   float(one.train_step(batch, noise, None, 1e-3)["loss"])) for _ in range(2)]
    return engine.speedups, losses, {k: dict(v) for k, v in counters.items()}


@pytest.mark.parametrize("halves", [False, True], ids=["tp2sp", "tp2-halves"])
def test_compiled_tp2_sp_equals_one_process(halves):
    """Compilation works under tensor + sequence parallelism (an earlier CPU probe that 'did not
    finish' was inductor's C++ build, two ranks on two cores): the compiled TP=2 engine's losses
    over 2 steps equal the eager one-process run's; and dynamo traced each region kind (the Pretzel
    unit, the shallow coupling) once, whole: no graph break and no recompile (on 2 H200s a graph
    break at every sequence-parallel all-gather made compiled TP2+SP 2x slower than TP2). The same for
    plain TP with parallel.tp_overlap (batch halves: deferred all-reduces waited where the halves join) and the
    document mask as a FlexAttention BlockMask split per half, without checkpointing, as h200_1b runs (under
    selective checkpointing the split BlockMask is a graph break on torch 2.13: 'HOP: Unsafe side effect')."""
    from tests.distributed import run_distributed
    for speedups, losses, counters in run_distributed(_tp2_compiled, 2, halves):
        assert "graph_break" not in counters, counters["graph_break"]
        assert counters["frames"]["total"] == counters["stats"]["unique_graphs"] == 2, counters
        assert speedups[0]["compiled_regions"] == 2 + 2 and (speedups[0]["checkpointed_blocks"] > 0) != halves
        for got, want in losses:
            assert abs(got - want) < 1e-5 * max(1.0, abs(want)), losses


class DeviceOnly(torch.Tensor):
    """A tensor whose value must not be read on the host (float(), .item(), bool()): what a CUDA
    graph's replay could not see change."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.tolist):
            raise AssertionError(f"the learning rate was read on the host ({func.__name__})")
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.__deepcopy__:  # a state_dict copy: a plain tensor
                return args[0].as_subclass(torch.Tensor).clone()
            return func(*args, **(kwargs or {}))


def test_flat_adamw_reads_nothing_on_the_host():
    """The flat step on the fused path (clipping as grad_scale, the skip flag found_inf, both 0-d on
    the device) adds the flag to the step counts as a list of tensors (`_foreach_add_.List`), never as
    a scalar: `torch._foreach_add_(steps, 0-d tensor)` binds the tensor to the op's Scalar overload,
    a host read (`.item()`) of a CUDA tensor in every step, which a CUDA graph capture refuses
    (train.step_graph=on with the flat AdamW failed on the H200 for that). The step counts still
    advance by one per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))
    cfg = run_config()
    model = build_model(cfg.model, seed=0)
    w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=True, flat_step=True)
    batch = make_batch(cfg.model)
    for s in range(2):
        w.zero_grad()
        model(batch, make_noise(cfg.model, batch, seed=s))[0].float().backward()
        w.grads_to_main()
        with Ops() as ops:
            w.clip_and_step(1e-2)
    foreach = {f for f in ops.seen if "_foreach_" in f}
    assert "aten._foreach_add_.List" in foreach and not [f for f in foreach if f.endswith((".Scalar", ".Tensor"))], foreach
    assert all(float(w.optimizer.state[p]["step"]) == 2.0 for p in w.params)


@pytest.mark.parametrize("fused,lr_tensor", [(False, False), (True, False), (True, True)],
                         ids=["foreach", "fused", "fused-lr-tensor"])
def test_flat_adamw_step_equals_torch_adamw(fused, lr_tensor):
    """MainWeights' one-pass step over the flat buffers (megaflow/flat_adamw.py; its torch definition,
    which the CUDA Triton kernel computes) equals torch's AdamW + the bf16 refresh: 3 steps with a
    changing lr, weight decay on matrices only, clipping (fused: as grad_scale), a skipped NaN step
    (fused: found_inf on the device), then an optimizer state_dict round trip into a fresh
    MainWeights whose next step still agrees. The moments stay torch's state (views of flat buffers).
    lr_tensor: the flat step's lr is one 0-d tensor shared by the groups, as under train.step_graph
    (read where the buffers are, never as a host float), against torch's AdamW with the float lr."""
    cfg = run_config()
    batch = make_batch(cfg.model)
    runs = {}
    for flat in (True, False):
        model = build_model(cfg.model, seed=0)
        w = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=fused, flat_step=flat)
        assert w.flat_step == flat
        for s in range(4):
            lr = 1e-3 * (s + 1)
            set_lr(w.optimizer, torch.tensor(lr).as_subclass(DeviceOnly) if flat and lr_tensor else lr)
            w.zero_grad()
            model(batch, make_noise(cfg.model, batch, seed=s))[0].float().backward()
            w.grads_to_main()
            if s == 2:  # a NaN gradient: the step is skipped, nothing changes
                w.flat_main_grad[0] = float("nan")
            w.clip_and_step(1e-2 if s else 0.0)
        runs[flat] = (w, model)
    (fw, fm), (rw, rm) = runs[True], runs[False]
    flat_storage = fw._flat[0].untyped_storage().data_ptr()  # the moments are views of one flat buffer
    assert all(fw.optimizer.state[p][k].untyped_storage().data_ptr() == flat_storage
               for p in fw.params for k in ("exp_avg", "exp_avg_sq"))
    for p, q in zip(fw.params, rw.params):
        sp, sq = fw.optimizer.state[p], rw.optimizer.state[q]
        assert float(sp["step"]) == float(sq["step"]) == 3.0
        torch.testing.assert_close(sp["exp_avg"], sq["exp_avg"], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(sp["exp_avg_sq"], sq["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for w in (fw, rw):  # the bf16 weights are the main weights, rounded
        assert torch.equal(w.flat_param, w.flat_main.to(torch.bfloat16))
    model = build_model(cfg.model, seed=1)
    model.load_state_dict(fw.full_precision_state(fm))
    w2 = MainWeights(model, param_groups(model, 0.05), cfg.train, torch.bfloat16, fused=fused, flat_step=True)
    w2.optimizer.load_state_dict(copy.deepcopy(fw.optimizer.state_dict()))  # as from a file: nothing shared
    for w, m in ((w2, model), (fw, fm)):  # the loaded copy and the original go on identically
        w.zero_grad()
        m(batch, make_noise(cfg.model, batch, seed=9))[0].float().backward()
        w.grads_to_main()
        w.clip_and_step(1e-2)
    assert w2._flat[0].data_ptr() != fw._flat[0].data_ptr()
    for p, q in zip(w2.params, fw.params):
        assert float(w2.optimizer.state[p]["step"]) == 4.0
        assert torch.equal(w2.optimizer.state[p]["exp_avg"], fw.optimizer.state[q]["exp_avg"])
        assert torch.equal(p, q)


def test_decay_kinds_mark_each_block_none_all_or_mixed():
    """flat_adamw.decay_kinds: 0 where a block has no decayed element, 1 where all are, 2 where the flat AdamW
    kernel must read the mask; a short last block is judged by its real elements only."""
    from megaflow.flat_adamw import decay_kinds
    decay = torch.zeros(10 * 8 + 3, dtype=torch.bool)
    decay[8:16] = True  # block 1: all
    decay[20:23] = True  # block 2: mixed
    decay[80:83] = True  # the last (3-element) block: all of its real elements
    assert decay_kinds(decay, 8).tolist() == [0, 1, 2] + [0] * 7 + [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
@pytest.mark.parametrize("grad_dtype,moments", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
def test_flat_adamw_kernel_equals_its_reference(grad_dtype, moments):
    """adamw_triton (one Triton kernel, decay read only in mixed blocks) == adamw_reference: weight decay on
    ranges that start and end inside blocks, clipping as grad_scale, a device lr, then a skipped step
    (found_inf) that writes nothing; fp32 and bf16 gradients (train.bf16_grads), fp32 and bf16 moments
    (train.moments_dtype: the same fp32 arithmetic, rounded as stored; one bf16 ulp apart at most)."""
    from megaflow.flat_adamw import adamw_reference, adamw_triton, decay_kinds
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 3 * 4096 + 1000
    decay = torch.zeros(n, dtype=torch.bool, device="cuda")
    decay[100:5000] = True
    decay[9000:] = True
    runs = []
    for kernel in (adamw_reference, adamw_triton):
        main = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        m, v = torch.zeros(n, device="cuda", dtype=moments), torch.zeros(n, device="cuda", dtype=moments)
        param = main.to(torch.bfloat16)
        for step in (1, 2, 3):
            grad = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step)).to(grad_dtype)
            skip = torch.tensor(float(step == 3), device="cuda")  # the third step is skipped
            kwargs = dict(grad_scale=torch.tensor(1.7, device="cuda"), found_inf=skip)
            if kernel is adamw_triton:
                kwargs["kinds"] = decay_kinds(decay)
            kernel(main, grad, m, v, param, decay, torch.tensor(float(step), device="cuda"),
                   torch.tensor(1e-2, device="cuda"), 0.9, 0.95, 1e-8, 0.1, **kwargs)
        runs.append((main, m, v, param))
    assert decay_kinds(decay).tolist() == [2, 2, 2, 1]
    for i, (a, b) in enumerate(zip(*runs)):  # main, m, v, param
        # bf16 moments: fp32 arithmetic that differs in its last bit (FMA) can round a stored moment one bf16 ulp
        # (0.4%) the other way, and that element's later updates by as much (a wrong store: wrong by far more)
        loose = moments == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=8e-3 if loose else 1e-6, atol=1e-4 if loose else 1e-7)
    assert runs[1][1].dtype == runs[1][2].dtype == moments


def test_compile_mode_tuned_is_inductor_with_coordinate_descent(monkeypatch):
    """train.compile_mode=tuned compiles with inductor's coordinate-descent tuning as an option (torch.compile takes
    a mode or options, not both), computes what eager does, and is one region per (function, backend, mode);
    other backends get no inductor options; an unknown mode is refused by name."""
    from megaflow import speed

    def g(x):
        return torch.sin(x) * 2 + x

    x = torch.linspace(-2, 2, 64)
    torch.testing.assert_close(speed._compiled_fn(g, "inductor", "tuned")(x), g(x))
    seen = []
    monkeypatch.setattr(speed, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    for backend, mode in (("inductor", "tuned"), ("inductor", "default"), ("aot_eager", "tuned"), ("inductor", "tuned")):
        speed._compiled_fn(g, backend, mode)
    assert seen == [dict(backend="inductor", dynamic=False, options={"coordinate_descent_tuning": True}),
                    dict(backend="inductor", dynamic=False, mode=None), dict(backend="aot_eager", dynamic=False, mode=None)]
    with pytest.raises(ValueError, match="compile_mode='fast'"):
        speed.check_compile_settings("unit", "fast")
