"""The Transformer Engine swaps handle the fused projections (CPU, with a stand-in for `te.Linear`).

Transformer Engine needs CUDA, so `FakeTE.Linear` plays it: the constructor of `te.Linear`
(tp_group, tp_size, parallel_mode, sequence_parallel, params_dtype, device), a local weight of the
rank's rows (column) or columns (row), and the collectives TE runs itself (under sequence
parallelism on its (T, B, D) layout: a column layer all-gathers T, a row layer reduce-scatters it).

Contract:
- `apply_te_dense` (TP=1, the FP8 path) turns every block's qkv, o_proj, gate_up and down_proj into
  `te.Linear` with the same weights under the same names: same loss as before the swap;
- backend 'te' at TP2 splits the fused qkv and gate_up part by part (a rank's q AND k/v heads, gate
  AND up rows): the loss equals the single-process model's (1e-5), and the gathered state dict
  gives back its weights; so does TP2 with sequence parallelism (attention takes T from the
  projection TE gathered, not from its T / tp input: on 2 H200s the old code failed there);
- FP8 in the engines (issue 19): the pipeline engine built by `build_stages` with backend 'te' at
  tp=1 runs each micro-batch's forward in its own `fp8_autocast` (amax group: the topology's),
  passes `is_first_microbatch` True on micro-batch 0 and False after it, recomputes checkpointed
  blocks through TE's `checkpoint`, and trains to the local backend's losses;
- `check_layout` refuses an FP8 layout whose local GEMM dimension is not divisible by 16, naming it.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import dataclasses
import types
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.starflow import build_model
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config


CALLS = {"first": [], "autocast": [], "checkpoint": 0}


class FakeLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, tp_group=None, tp_size=1, parallel_mode=None,
                 sequence_parallel=False, params_dtype=None, device=None):
        rows = out_features // tp_size if parallel_mode == "column" else out_features
        cols = in_features // tp_size if parallel_mode == "row" else in_features
        super().__init__(cols, rows, bias=bias, device=device, dtype=params_dtype)
        self.mode, self.group, self.sp = parallel_mode, tp_group, sequence_parallel

    def forward(self, x, is_first_microbatch=None):
        from parallel.comm import copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq
        CALLS["first"].append(is_first_microbatch)
        if self.sp and self.mode == "column":  # x: (T / tp, B, D)
            return F.linear(gather_seq(x.transpose(0, 1), self.group).transpose(0, 1), self.weight, self.bias)
        if self.sp and self.mode == "row":
            y = reduce_scatter_seq(F.linear(x, self.weight).transpose(0, 1), self.group).transpose(0, 1)
            return y if self.bias is None else y + self.bias
        if self.mode == "column":
            return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        if self.mode == "row":
            y = reduce_from_tp(F.linear(x, self.weight), self.group)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


@contextlib.contextmanager
def fake_autocast(enabled, fp8_recipe, fp8_group):
    CALLS["autocast"].append((enabled, fp8_recipe, fp8_group))
    yield


def fake_checkpoint(fn, *args, use_reentrant):
    CALLS["checkpoint"] += 1
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=use_reentrant)


FakeTE = types.SimpleNamespace(Linear=FakeLinear, fp8_autocast=fake_autocast, checkpoint=fake_checkpoint)


def reference():
    cfg = replace(tiny_config(), stage="all")
    model = build_model(cfg, "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    return cfg, model, batch, make_noise(cfg, batch)


def _te_tp2(rank, world):
    import parallel.backend
    from parallel.checkpoint_tp import gather_full_state_dict
    from parallel.tensor_parallel import build_tp_model
    from parallel.topology import ParallelConfig, Topology
    parallel.backend.import_te = lambda: FakeTE
    cfg, ref, batch, noise = reference()
    model = build_tp_model(cfg, Topology(tp=2), ParallelConfig(tp=2, backend="te"), state_dict=ref.state_dict())
    qkv = model.units["0"].vlm_layers[0].self_attn.qkv
    assert isinstance(qkv, FakeLinear) and qkv.tp_parts["weight"] == ((32, True), (16, True), (16, True))
    full = gather_full_state_dict(model)
    sp = build_tp_model(cfg, Topology(tp=2), ParallelConfig(tp=2, backend="te", sequence_parallel=True),
                        state_dict=ref.state_dict())
    return {"loss": float(model(batch, noise)[0]), "ref": float(ref(batch, noise)[0]), "sp": float(sp(batch, noise)[0]),
            "weights": all(torch.equal(full[k], v) for k, v in ref.state_dict().items())}


def test_te_swaps_keep_fused_weights(monkeypatch):
    import parallel.backend
    monkeypatch.setattr(parallel.backend, "import_te", lambda: FakeTE)
    cfg, ref, batch, noise = reference()
    dense = parallel.backend.apply_te_dense(copy.deepcopy(ref))
    kinds = {n.rsplit(".", 1)[-1] for n, m in dense.named_modules() if isinstance(m, FakeLinear)}
    assert kinds == {"qkv", "o_proj", "gate_up", "down_proj"}
    assert dense.state_dict().keys() == ref.state_dict().keys()
    assert torch.allclose(dense(batch, noise)[0], ref(batch, noise)[0], atol=1e-6)
    for r in run_distributed(_te_tp2, 2):
        assert abs(r["loss"] - r["ref"]) < 1e-5 and abs(r["sp"] - r["ref"]) < 1e-5 and r["weights"], r


def test_fp8_per_micro_batch_in_the_pipeline_engine(monkeypatch):
    import parallel.backend
    from parallel.runtime import build_engine, build_stages
    from parallel.topology import ParallelConfig, Topology
    from tests.train.test_fast_step import run_config
    monkeypatch.setattr(parallel.backend, "import_te", lambda: FakeTE)
    monkeypatch.setattr(parallel.backend, "_fp8_recipe", lambda name: f"recipe:{name}")
    cfg, ref, batch, noise = reference()
    losses = {}
    for backend, fp8 in (("local", "off"), ("te", "delayed")):
        run = run_config(activation_checkpointing="full")
        run = dataclasses.replace(run, model=cfg, parallel=ParallelConfig(backend=backend, fp8=fp8, micro_batches=2))
        model, stages, tied = build_stages(cfg, run.parallel, Topology(), torch.device("cpu"), 0,
                                           full_state=ref.state_dict(), seq_len=48)
        engine = build_engine(run, model, stages, tied, Topology(), None)
        CALLS.update(first=[], autocast=[], checkpoint=0)
        losses[backend] = [engine.train_step(batch, noise, None, 1e-3)["loss"] for _ in range(2)]
        if backend == "te":
            # per step (1F1B at pp=1): forward of micro-batch 0 (cast and keep the FP8 weights), its
            # backward's recomputation (None: cast afresh), micro-batch 1 (reuse), its recomputation
            runs = [k for k, _ in itertools.groupby(CALLS["first"])]
            assert runs == [True, None, False, None] * 2, runs
            assert CALLS["autocast"] == [(True, "recipe:delayed", None)] * 4
            assert CALLS["checkpoint"] > 0
    assert losses["te"] == pytest.approx(losses["local"], rel=1e-5)


def test_check_layout_refuses_fp8_gemms_te_cannot_serve():
    from parallel.runtime import check_layout
    from parallel.topology import ParallelConfig
    cfg = replace(tiny_config(dim=48, shallow_dim=32), stage="all")  # flow width 48 (4 heads of 12), VLM 32
    check_layout(ParallelConfig(backend="te", fp8="delayed"), 1, cfg)
    with pytest.raises(ValueError, match=r"flow_layer.self_attn.qkv would be a 72 x 48 weight on each rank \(tp=2\)"
                                         r".*divisible by 16"):
        check_layout(ParallelConfig(tp=2, backend="te", fp8="current"), 2, cfg)
    check_layout(ParallelConfig(tp=2, backend="te"), 2, cfg)  # bf16 TE layers: no such limit
    # the shallow flows' blocks are split by flow_tp too (apply_tp): width 16 (2 heads of 8) serves
    # FP8 whole, not halved
    cfg = replace(tiny_config(dim=64), stage="all")
    check_layout(ParallelConfig(tp=2, flow_tp=1, backend="te", fp8="delayed"), 2, cfg)
    with pytest.raises(ValueError, match=r"shallow.blocks.0.layers.0.self_attn.qkv would be a 24 x 16 weight on each "
                                         r"rank \(tp=2\)"):
        check_layout(ParallelConfig(tp=2, backend="te", fp8="delayed"), 2, cfg)
