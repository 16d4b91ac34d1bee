"""The CPU step of configs/tarflow_fmnist28.yaml (issue 16's s/step) keeps its fast shape.

- a compiled shallow coupling receives its RoPE tables as inputs: a table made inside the compiled
  region is recomputed (pow, cos, sin) for every element RoPE touches, forward and backward, which
  was 17-19% of that config's one-thread CPU step (two threads: docs/benchmarks.md,
  "TarFlow-only Fashion-MNIST on the CPU: the last 15%"); the loss equals eager's.
"""
from __future__ import annotations

import torch

from megaflow.model.starflow import build_model
from megaflow.speed import apply_compile
from tests.helpers import make_batch, make_noise, tiny_config


def test_compiled_coupling_gets_rope_tables_as_inputs():
    """Every graph dynamo captures for a shallow coupling (unit scope) is free of trigonometry, and
    the compiled model's loss equals eager's."""
    cfg = tiny_config(tarflow_only=True)
    batch = make_batch(cfg)
    noise = make_noise(cfg, batch)
    ref, model = build_model(cfg, seed=0), build_model(cfg, seed=0)
    graphs = []

    def record(gm, example_inputs):  # a dynamo backend that keeps the graph and runs it as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    apply_compile(model, backend=record, scope="unit")
    loss = model(batch, noise)[0]
    loss.backward()
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    assert graphs and any("softplus" in op for op in ops)  # the couplings' graphs were captured
    trig = [op for op in ops if op.split(".")[-1].rstrip(">'") in ("cos", "sin")]
    assert not trig, f"RoPE tables computed inside a compiled region: {trig}"
    torch.testing.assert_close(loss.detach(), ref(batch, noise)[0].detach(), rtol=1e-5, atol=1e-6)
