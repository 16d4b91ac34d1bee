"""The Transformer Engine swaps handle the fused projections (CPU, with a stand-in for `te.Linear`).

Transformer Engine needs CUDA, so `FakeTE.Linear` plays it: the constructor of `te.Linear`
(tp_group, tp_size, parallel_mode, sequence_parallel, params_dtype, device), a local weight of the
rank's rows (column) or columns (row), and the collectives TE runs itself (no sequence parallelism).

Contract:
- `apply_te_dense` (TP=1, the FP8 path) turns every block's qkv, o_proj, gate_up and down_proj into
  `te.Linear` with the same weights under the same names: same loss as before the swap;
- backend 'te' at TP2 splits the fused qkv and gate_up part by part (a rank's q AND k/v heads, gate
  AND up rows): the loss equals the single-process model's (1e-5), and the gathered state dict
  gives back its weights.
"""
from __future__ import annotations

import copy
import types
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.starflow import build_model
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config


class FakeLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, tp_group=None, tp_size=1, parallel_mode=None,
                 sequence_parallel=False, params_dtype=None, device=None):
        assert not sequence_parallel
        rows = out_features // tp_size if parallel_mode == "column" else out_features
        cols = in_features // tp_size if parallel_mode == "row" else in_features
        super().__init__(cols, rows, bias=bias, device=device, dtype=params_dtype)
        self.mode, self.group = parallel_mode, tp_group

    def forward(self, x):
        from parallel.comm import copy_to_tp, reduce_from_tp
        if self.mode == "column":
            return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        if self.mode == "row":
            y = reduce_from_tp(F.linear(x, self.weight), self.group)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


FakeTE = types.SimpleNamespace(Linear=FakeLinear)


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
    return {"loss": float(model(batch, noise)[0]), "ref": float(ref(batch, noise)[0]),
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
        assert abs(r["loss"] - r["ref"]) < 1e-5 and r["weights"], r
