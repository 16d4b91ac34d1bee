"""train.step_graph (megaflow/step_graph.py): the whole training step as one CUDA graph.

- the setting is checked where the run is built: an unknown value, a CPU run, reduce-overhead
  compilation and PlainEngine's data parallelism each fail with one line naming the setting;
- on CUDA (skipped elsewhere), graphed steps are the eager steps: the same losses, step by step
  (earlier steps' returned values are not overwritten by later replays), the same fp32 main
  weights after a learning-rate schedule, with and without packed-document masks, with the flat
  one-pass AdamW kernel (the default: it is captured in the graph) and with torch's fused AdamW.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megaflow.config import ConfigError, load_config
from megaflow.model.starflow import build_model
from megaflow.optim import lr_at
from megaflow.step_graph import check_step_graph
from megaflow.train import PlainEngine, read_metrics, to_device
from tests.helpers import make_batch, make_noise, tiny_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def run_config(**train):
    cfg = load_config(str(TINY))
    return dataclasses.replace(cfg, model=tiny_config(tarflow_only=True), train=dataclasses.replace(cfg.train, **train))


def test_step_graph_settings_are_checked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert check_step_graph("off", cpu) is False
    with pytest.raises(ValueError, match="train.step_graph='maybe' must be one of"):
        check_step_graph("maybe", cuda)
    with pytest.raises(ValueError, match="reduce-overhead"):
        check_step_graph("on", cuda, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="not the one-process engine's after-backward reduction"):
        check_step_graph("on", cuda, data_parallel=True)  # PlainEngine's DP path (the parallel engine's is graphed)
    cfg = run_config(compile="off", step_graph="on")
    with pytest.raises(ConfigError, match="train.step_graph=on needs a CUDA device"):
        PlainEngine(build_model(cfg.model, seed=0), cfg, None)


def test_one_process_checks_its_parallel_settings(monkeypatch):
    """PlainEngine asks with the run's parallel settings, so Transformer Engine layers (not captured) are
    refused in one process as in the parallel engine (it used to pass none: a te run went into the graph).
    The device check is moved past (a CUDA device as the check sees it) so the CPU reaches that rule."""
    import megaflow.step_graph as step_graph
    real = step_graph.check_step_graph
    monkeypatch.setattr(step_graph, "check_step_graph", lambda mode, device, *a, **k: real(mode, torch.device("cuda"), *a, **k))
    cfg = run_config(compile="off", step_graph="on", param_dtype="fp32")
    te = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, backend="te"))
    with pytest.raises(ConfigError, match=r"graphs the local layers only \(parallel.backend='te'"):
        PlainEngine(build_model(cfg.model, seed=0), te, None)


def train(step_graph: str, doc_ids: bool, steps: int = 6, flat_step: bool = True):
    cfg = run_config(compile="off", step_graph=step_graph, dtype="bf16", param_dtype="bf16", grad_clip=0.5)
    device = torch.device("cuda")
    model = build_model(cfg.model, device, seed=0)
    engine = PlainEngine(model, cfg, torch.bfloat16)
    default_flat = engine.weights.flat_step  # the CUDA default, graphed or not: the flat kernel
    engine.weights.flat_step = flat_step  # False: torch's fused AdamW (capturable) instead
    outs = []
    for s in range(steps):
        host = make_batch(cfg.model, batch_size=4, seed=s % 3, two_docs=doc_ids)
        if not doc_ids:
            host.pop("doc_ids")
        batch = to_device(host, device)
        noise = make_noise(cfg.model, host, seed=100 + s).to(device)
        outs.append(engine.train_step(batch, noise, torch.ones(4, device=device), lr_at(s, 1e-3, 1e-4, 2, steps)))
    engine.default_flat = default_flat
    return engine, [read_metrics(o) for o in outs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("flat_step", [True, False], ids=["flat-adamw", "torch-adamw"])
@pytest.mark.parametrize("doc_ids", [False, True], ids=["causal", "packed"])
def test_graphed_steps_equal_eager_steps(doc_ids, flat_step):
    eager, eager_out = train("off", doc_ids, flat_step=flat_step)
    graphed, graphed_out = train("on", doc_ids, flat_step=flat_step)
    assert graphed.graph.graph is not None  # 2 eager warm-up steps, then captured and replayed
    assert graphed.default_flat  # train.step_graph=on keeps the flat kernel by default
    assert graphed.weights.flat_step == flat_step  # and it ran in the graph: no fallback to torch's
    # CUDA attention backward accumulates with atomics, so two eager runs differ in the last bits too:
    # on the H200 the graphed grad norms were within 7e-5 of the eager ones (losses within 1e-6)
    for a, b in zip(eager_out, graphed_out):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-4, abs=1e-6)
    assert len({o["loss"] for o in graphed_out}) == len(graphed_out)  # each step's own value
    for p, q in zip(eager.weights.params, graphed.weights.params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_capture_survives_another_thread_pinning_host_memory():
    """data.prefetch's thread pins the next batch while the loop's thread captures the step; the
    pinned allocator's cudaHostAlloc / event queries from that thread invalidated a global-mode
    capture (h200_1b on real data, round 9). The capture is thread-local now."""
    import threading
    stop = threading.Event()

    def pin_forever():
        while not stop.is_set():
            torch.empty(1 << 18).pin_memory()  # a new pinned block each time, the last one freed
    pinner = threading.Thread(target=pin_forever, daemon=True)
    pinner.start()
    try:
        graphed, _ = train("on", True, steps=4)
    finally:
        stop.set()
        pinner.join()
    assert graphed.graph.graph is not None

