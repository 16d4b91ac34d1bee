"""train.step_graph=on for multi-process layouts (megaflow/step_graph.py, parallel/engine.py): tensor,
data and pipeline parallelism and their products are graphed (TP with or without SP, async TP without SP,
micro-batches, torch-backend FP8; DP with its gradient buckets in place, their priority stream or smaller
last bucket; PP with 1F1B or the interleaved schedule, each rank's whole schedule); ZeRO, Transformer Engine, the symmetric-memory routes
of TP, data-parallel buckets that copy gradients (fp32 weights) and PlainEngine's data-parallel path are
refused with one ValueError naming the setting; 'auto' graphs where 'on' would, so DP2 is graphed;
ParallelEngine and ZeroEngine check the setting where they are built. On CPU: the contract only; that the
step functions the graph captures read nothing back to the host is tests/parallel/test_overlap.py's TP=2,
DP=2 and PP=2 tests, and graphed steps against eager ones are measured on GPUs (tools/device/h200x2_tp.sh graph,
tools/device/h200x2_dp.sh).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megaflow.config import load_config
from megaflow.step_graph import check_step_graph
from parallel.topology import ParallelConfig, Topology
from tests.helpers import tiny_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


GRAPHED = [dict(tp=2), dict(tp=2, sequence_parallel=True), dict(tp=2, async_tp=True), dict(tp=2, micro_batches=2),
           dict(tp=2, async_tp=True, tp_overlap=2), dict(tp=2, sequence_parallel=True, tp_overlap=2),  # batch chunks
           dict(tp=2, fp8="current", fp8_backend="torch"),
           # data parallelism (dp = world / (tp x pp) is not a ParallelConfig field: these hold for any world size)
           dict(), dict(micro_batches=4), dict(overlap=False), dict(dp_comm_priority=True, last_bucket_mb=40.0),
           # pipelines: each rank's whole schedule, its sends and receives included
           dict(pp=2, micro_batches=8), dict(pp=2, schedule="interleaved", virtual_stages=2, micro_batches=8),
           dict(tp=2, pp=2, micro_batches=4)]
REFUSED = [(dict(pp=2, zero_stage=1), r"parallel.zero_stage=1"), (dict(tp=2, zero_stage=1), r"parallel.zero_stage=1"),
           (dict(tp=2, backend="te"), r"parallel.backend='te'"),
           (dict(tp=2, tp_all_reduce="symm"), r"parallel.tp_all_reduce='symm'"),
           (dict(tp=2, sequence_parallel=True, async_tp=True), r"parallel.async_tp=true under sequence_parallel")]


@pytest.mark.parametrize("fields", GRAPHED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_tensor_parallel_layouts_are_graphed(fields):
    """TP steps hold only the TP group's NCCL collectives (and the fp32 norm's all-reduce): graphed."""
    assert check_step_graph("on", torch.device("cuda"), parallel=ParallelConfig(**fields)) is True
    assert check_step_graph("off", torch.device("cuda"), parallel=ParallelConfig(**fields)) is False


@pytest.mark.parametrize("fields,message", REFUSED, ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items())
                         if isinstance(x, dict) else "")
def test_what_cannot_be_graphed_is_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=rf"train.step_graph=on .*{message}.*set train.step_graph=off"):
        check_step_graph("on", torch.device("cuda"), parallel=ParallelConfig(**fields))


@pytest.mark.parametrize("fields,message", REFUSED, ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items())
                         if isinstance(x, dict) else "")
def test_auto_graphs_where_on_would_and_says_why_not_elsewhere(fields, message, caplog):
    """'auto' (the setting a config keeps for every layout): graphed where 'on' is, not graphed (no error)
    where 'on' is refused, with the reason logged; never on a CPU, nor under data parallelism."""
    caplog.set_level("INFO", logger="megaflow")
    assert check_step_graph("auto", torch.device("cuda"), parallel=ParallelConfig(tp=2)) is True
    assert check_step_graph("auto", torch.device("cuda")) is True  # one process
    assert check_step_graph("auto", torch.device("cuda"), parallel=ParallelConfig(**fields)) is False
    assert any(message.replace("\\", "") in r.getMessage() for r in caplog.records), caplog.text
    assert check_step_graph("auto", torch.device("cpu")) is False
    assert check_step_graph("auto", torch.device("cuda"), data_parallel=True) is False  # PlainEngine's DP path
    assert check_step_graph("auto", torch.device("cuda"), parallel=ParallelConfig()) is True  # DP2 (ParallelEngine)
    assert check_step_graph("auto", torch.device("cuda"), parallel=ParallelConfig(pp=2, micro_batches=8)) is True
    # a pipeline with TP or DP: graphed by 'on' only (not yet replayed on GPUs), and 'auto' says how to graph it
    for pcfg, dp in ((ParallelConfig(pp=2, tp=2, micro_batches=8), 1), (ParallelConfig(pp=2, micro_batches=8), 2)):
        assert check_step_graph("on", torch.device("cuda"), parallel=pcfg, dp=dp) is True
        caplog.clear()
        assert check_step_graph("auto", torch.device("cuda"), parallel=pcfg, dp=dp) is False
        assert "set train.step_graph=on" in caplog.text, caplog.text
    with pytest.raises(ValueError, match="must be one of"):
        check_step_graph("yes", torch.device("cuda"))


def test_parallel_engine_checks_the_setting():
    """ParallelEngine (the TP / PP / DP engine) refuses train.step_graph=on on the CPU as PlainEngine does
    (it used to ignore the setting) and builds with it off; ZeroEngine checks the setting too (on a GPU
    it refuses ZeRO by name, the case above)."""
    from parallel.engine import ParallelEngine
    from parallel.runtime import build_stages
    from parallel.zero import ZeroEngine
    cfg = load_config(str(TINY))
    cfg = dataclasses.replace(cfg, model=tiny_config(n_layers=2),
                              train=dataclasses.replace(cfg.train, compile="off", step_graph="on"))
    topo = Topology(rank=0, world_size=1)
    _, stages, tied = build_stages(cfg.model, cfg.parallel, topo, "cpu", 0, None, 48)
    with pytest.raises(ValueError, match="train.step_graph=on needs a CUDA device"):
        ParallelEngine(stages, cfg, None, topo, tied)
    off = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, step_graph="off"))
    assert ParallelEngine(stages, off, None, topo, tied).graph is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        ZeroEngine(None, cfg, None, topo, stages=stages, tied=tied)


def test_data_parallel_buckets_that_copy_gradients_are_refused(caplog):
    """Graphed DP needs every gradient bucket to be a slice of the flat fp32 main-gradient buffer (bf16 weights);
    buckets that copy gradients (fp32 weights) read flags on the host: refused by name, and 'auto' says why."""
    caplog.set_level("INFO", logger="megaflow")
    with pytest.raises(ValueError, match=r"train.step_graph=on graphs data-parallel gradient buckets .*param_dtype=fp32"
                                         r".*set train.step_graph=off or train.param_dtype=bf16"):
        check_step_graph("on", torch.device("cuda"), parallel=ParallelConfig(), copied_buckets=True)
    assert check_step_graph("auto", torch.device("cuda"), parallel=ParallelConfig(), copied_buckets=True) is False
    assert any("copy gradients (fp32 weights" in r.getMessage() for r in caplog.records), caplog.text
    # auto's line drops "set train.step_graph=off" (done) and keeps the setting that would graph the step
    assert any(r.getMessage().endswith("; to graph it set train.param_dtype=bf16)") for r in caplog.records), caplog.text
    caplog.clear()
    assert check_step_graph("auto", torch.device("cuda"), parallel=ParallelConfig(zero_stage=1)) is False
    assert any(r.getMessage().endswith("(parallel.zero_stage=1); to graph it set parallel.zero_stage=0)")
               for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match="through the parallel engine"):
        check_step_graph("on", torch.device("cuda"), data_parallel=True)
