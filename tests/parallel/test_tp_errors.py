"""Configurations tensor parallelism cannot split fail early with an error a user can act on.

Contract: a degree that does not divide the attention heads, the hidden size, the MLP size or the
vocabulary (or key/value heads that can be neither split nor replicated) raises ValueError naming
the dimension, its value and the degree, before any layer is swapped; sequence parallelism with two
different stream degrees is refused; the 'te' backend on a machine without Transformer Engine
raises one clear RuntimeError, and nothing imports Transformer Engine under the 'local' backend.
No processes needed: the checks run before any collective.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from megaflow.model.config import VLMConfig
from megaflow.model.starflow import build_model
from parallel.backend import get_backend
from parallel.tensor_parallel import apply_tp, check_tp
from parallel.topology import ParallelConfig, Topology
from tests.helpers import tiny_config


def split(cfg, tp, flow_tp=0, sp=False):
    model = build_model(cfg)
    before = [type(m) for m in model.modules()]
    topo = Topology(tp=tp, flow_tp=flow_tp, rank=0, world_size=tp)
    try:
        apply_tp(model, topo, ParallelConfig(tp=tp, flow_tp=flow_tp, sequence_parallel=sp))
    finally:
        assert [type(m) for m in model.modules()] == before, "a failed apply_tp must not touch the model"


def vlm(cfg, **kw):
    return replace(cfg, vlm=replace(cfg.vlm, **kw))


@pytest.mark.parametrize("make_cfg,tp,expect", [
    (lambda: tiny_config(), 3, ["vlm.n_heads (attention heads)=4", "parallel.tp=3"]),
    (lambda: vlm(tiny_config(shallow_heads=4), dim=30, head_dim=8), 4, ["vlm.dim (hidden size)=30", "parallel.tp=4"]),
    (lambda: vlm(tiny_config(shallow_heads=4), ffn_dim=66), 4, ["vlm.ffn_dim (MLP size)=66", "parallel.tp=4"]),
    (lambda: vlm(tiny_config(shallow_heads=4), vocab_size=66), 4, ["vlm.vocab_size (vocabulary)=66", "parallel.tp=4"]),
    (lambda: vlm(tiny_config(), n_heads=6, n_kv_heads=3, dim=48), 2, ["vlm.n_kv_heads (key/value heads)=3", "parallel.tp=2"]),
    (lambda: tiny_config(tarflow_only=True, n_heads=4), 3, ["flow.n_heads (attention heads)=4", "flow tp=3",
                                                            "flow.n_cond_tokens (vocabulary)=64"]),
])
def test_indivisible_degree_names_dimension_and_degree(make_cfg, tp, expect):
    with pytest.raises(ValueError) as err:
        split(make_cfg(), tp)
    for text in expect:
        assert text in str(err.value), str(err.value)


def test_kv_heads_replicated_when_fewer_than_degree():
    check_tp(tiny_config(shallow_heads=4), 4)  # 2 kv heads, tp=4: replicated, no error


def test_sequence_parallel_needs_one_degree():
    with pytest.raises(ValueError, match="flow_tp=1 differs from parallel.tp=2"):
        split(tiny_config(), 2, flow_tp=1, sp=True)


def test_config_must_match_topology():
    with pytest.raises(ValueError, match="does not match the topology"):
        apply_tp(build_model(tiny_config()), Topology(tp=2, rank=0, world_size=2), ParallelConfig(tp=1))


def test_te_backend_without_transformer_engine_is_one_clear_error():
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine is installed here")
    except (ImportError, RuntimeError):
        pass
    with pytest.raises(RuntimeError, match="parallel.backend='te' needs NVIDIA Transformer Engine"):
        get_backend("te")
    with pytest.raises(ValueError, match="must be one of"):
        get_backend("megatron")


def test_local_backend_never_imports_transformer_engine():
    code = ("import sys, parallel.tensor_parallel, parallel.backend as b; b.get_backend('local'); "
            "assert not any(m.startswith('transformer_engine') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tp_all_reduce_route_is_checked():
    """parallel.tp_all_reduce names a route (NCCL or torch's symmetric memory); a typo is one clear error."""
    assert ParallelConfig(tp=2, tp_all_reduce="symm").tp_all_reduce == "symm"
    with pytest.raises(ValueError, match="parallel.tp_all_reduce='nvls' must be 'nccl' or 'symm'"):
        ParallelConfig(tp=2, tp_all_reduce="nvls")


def test_tp_overlap_is_checked():
    """parallel.tp_overlap is a number of row chunks (0 off, >= 2); with Transformer Engine's layers, or with
    async TP under SP (which owns the row-parallel reduce-scatter), it is one clear error naming the settings."""
    assert ParallelConfig(tp=2, tp_overlap=2, async_tp=True).tp_overlap == 2
    assert ParallelConfig(tp=2, tp_overlap=4, sequence_parallel=True).tp_overlap == 4
    with pytest.raises(ValueError, match=r"parallel.tp_overlap=1 must be 0 \(off\) or the number of row chunks"):
        ParallelConfig(tp=2, tp_overlap=1)
    with pytest.raises(ValueError, match=r"parallel.tp_overlap=2 splits the local backend's blocks.*backend='te'"):
        ParallelConfig(tp=2, tp_overlap=2, backend="te")
    with pytest.raises(ValueError, match=r"tp_overlap=2 defers .* set tp_overlap=0 or async_tp=false"):
        ParallelConfig(tp=2, tp_overlap=2, async_tp=True, sequence_parallel=True)


def test_tp_comm_reorder_is_on_with_tp_overlap_unless_asked():
    """parallel.tp_comm_reorder 'auto' (the default) reorders compiled TP graphs' collectives only with tp_overlap
    (its chunks overlap nothing compiled without it); 'on'/'off' (or true/false) decide; anything else is refused."""
    assert not ParallelConfig(tp=2).comm_reorder
    assert ParallelConfig(tp=2, tp_overlap=2).comm_reorder
    assert ParallelConfig(tp=2, tp_comm_reorder=True).comm_reorder
    assert not ParallelConfig(tp=2, tp_overlap=2, tp_comm_reorder="off").comm_reorder
    with pytest.raises(ValueError, match=r"parallel.tp_comm_reorder='always' must be 'auto', 'on' or 'off'"):
        ParallelConfig(tp=2, tp_comm_reorder="always")


def test_a_symmetric_memory_failure_is_warned_once_and_remembered(caplog):
    """parallel.tp_all_reduce=symm: where symmetric memory fails for a shape (a rendezvous or kernel refused),
    the all-reduce falls back to NCCL with one warning naming the shape and the reason, and later calls of that
    shape go to NCCL at once (before, every call tried again, silently); another shape still tries."""
    from parallel import comm
    calls = []

    def refused():
        calls.append(1)
        raise RuntimeError("symmetric memory is not supported here\nstack ...")

    key, other = ("tp0", (8, 16), torch.bfloat16, "cuda:0"), ("tp0", (8, 32), torch.bfloat16, "cuda:0")
    comm._symm_failed.discard(key), comm._symm_failed.discard(other)
    try:
        with caplog.at_level("WARNING", logger="megaflow"):
            assert comm._symm_try(key, refused) is None and comm._symm_try(key, refused) is None
        assert len(calls) == 1 and key in comm._symm_failed
        warned = [r.getMessage() for r in caplog.records if "symmetric memory failed" in r.getMessage()]
        assert len(warned) == 1 and "[8, 16]" in warned[0] and "is not supported here" in warned[0], warned
        assert comm._symm_try(other, lambda: "summed") == "summed" and other not in comm._symm_failed
    finally:
        comm._symm_failed.discard(key)
