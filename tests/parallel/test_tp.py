"""Tensor and sequence parallelism equal the single-process model (real gloo processes on CPU).

Contract: for an interleaved text-image batch through the whole model (both streams, Pretzel skips,
adapter, LM and Gaussian heads, shallow flows), a TP model loaded from (or sharded out of) the
single-process model's weights gives
- the same loss (within 1e-5, fp32),
- the same gradients once gathered (each tensor within 1e-5 relative to its largest entry),
- the same weights after 3 AdamW steps,
at TP=2 and TP=4, with and without sequence parallelism (and with async TP: parallel/async_tp.py),
for TarFlow-only, tied embeddings and a smaller flow degree (flow_tp=1). Sequence parallelism on a length tp does not divide is a clear
error. Each rank also runs the reference, so it compares locally. Both build paths are covered:
meta build + load_full_state_dict, and apply_tp on a materialised model.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from megaflow.model.starflow import build_model
from parallel.checkpoint_tp import gather_full_grads, gather_full_state_dict
from parallel.tensor_parallel import apply_tp, build_tp_model
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config

TOL = 1e-5


def reference(tarflow: bool = False, tied: bool = False, **flow):
    """A single-process model with every parameter perturbed away from its (partly zero) init, so
    that skips, adapter output and heads all carry signal; stage 'all' so everything trains."""
    cfg = replace(tiny_config(tarflow_only=tarflow, **flow), stage="all")
    if tied:
        cfg = replace(cfg, vlm=replace(cfg.vlm, tie_embeddings=True))
    model = build_model(cfg, "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return cfg, model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def run_case(tp: int, sp: bool, tarflow: bool = False, tied: bool = False, flow_tp: int = 0,
             path: str = "meta", steps: int = 3, async_tp: bool = False, tp_overlap: int = 0, flex: bool = False,
             **flow) -> dict:
    """`flex`: the document mask as a FlexAttention BlockMask, as on a GPU (tiny heads: applied densely from its rule)."""
    from megaflow.model.masks import use_kernel
    with use_kernel("flex" if flex else "auto"):
        return _run_case(tp, sp, tarflow, tied, flow_tp, path, steps, async_tp, tp_overlap, **flow)


def _run_case(tp, sp, tarflow, tied, flow_tp, path, steps, async_tp, tp_overlap, **flow) -> dict:
    cfg, ref = reference(tarflow, tied, **flow)
    pcfg = ParallelConfig(tp=tp, flow_tp=flow_tp, sequence_parallel=sp, async_tp=async_tp, tp_overlap=tp_overlap)
    topo = Topology(tp=tp, flow_tp=flow_tp)
    if path == "meta":
        model = build_tp_model(cfg, topo, pcfg, state_dict=ref.state_dict())
    else:
        model = apply_tp(copy.deepcopy(ref), topo, pcfg)
    kinds = {type(m) for m in model.modules()}
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    noise = make_noise(cfg, batch)
    cond_keep = torch.tensor([1.0, 0.0])  # row 1 drops the condition (guidance training)
    # Adam divides by sqrt(v) + eps; with the default eps=1e-8, an entry whose gradient is ~1e-8
    # turns the ~1e-9 rounding difference of a different summation order into an update difference
    # of ~lr. eps=1e-4 keeps the comparison about tensor parallelism, not about that amplification.
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    out = {"loss": 0.0, "grad": 0.0, "weight": 0.0, "worst": "", "kinds": {k.__name__ for k in kinds},
           "deferred": sum(getattr(m, "defer_reduce", False) for m in model.modules())}
    for step in range(steps):
        loss_ref, _ = ref(batch, noise, cond_keep)
        loss, _ = model(batch, noise, cond_keep)
        loss_ref.backward()
        loss.backward()
        out["loss"] = max(out["loss"], abs(loss.item() - loss_ref.item()))
        if step == 0:
            grads = gather_full_grads(model)
            ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
            out["grad_names_match"] = set(grads) == set(ref_grads)
            out["n_grads"] = len(grads)
            for n, g in ref_grads.items():
                e = rel_err(grads[n], g)
                if e >= out["grad"]:
                    out["grad"], out["worst"] = e, n
        for opt_ in (opt_ref, opt):
            opt_.step()
            opt_.zero_grad(set_to_none=True)
    full, ref_sd = gather_full_state_dict(model), ref.state_dict()
    out["weight"] = max(rel_err(full[k], v) for k, v in ref_sd.items())
    out["keys_match"] = set(full) == set(ref_sd)
    out["sharded"] = (model.units["0"].flow_layer.mlp.gate_up.weight.shape[0] == 2 * cfg.flow.ffn_dim // (flow_tp or tp))
    return out


def odd_length_error(tp: int) -> str:
    """Sequence parallelism on a T that tp does not divide: the error message."""
    cfg, ref = reference()
    pcfg = ParallelConfig(tp=tp, sequence_parallel=True)
    model = build_tp_model(cfg, Topology(tp=tp), pcfg, state_dict=ref.state_dict())
    batch = make_batch(cfg, batch_size=2, seq_len=47)
    try:
        model(batch, make_noise(cfg, batch))
    except ValueError as e:
        return str(e)
    return ""


def init_fingerprints(tp: int) -> dict:
    """A meta-built TP model initialised by init_tp_weights (flow_tp=1, so flow weights are
    replicated across the TP group): a few of its local tensors."""
    cfg = replace(tiny_config(), stage="all")
    model = build_tp_model(cfg, Topology(tp=tp, flow_tp=1), ParallelConfig(tp=tp, flow_tp=1), seed=3)
    sd = model.state_dict()
    keys = ["flow_in.weight", "flow_start", "adapter.2.bias", "units.0.vlm_layers.0.self_attn.qkv.weight",
            "units.0.flow_layer.mlp.gate_up.weight", "embed_tokens.weight"]
    return {k: sd[k].clone() for k in keys} | {"q_full_std": gather_full_state_dict(model)[keys[3]].std()}


def _worker(rank, world, cases):
    torch.manual_seed(0)
    extra = (odd_length_error(world), init_fingerprints(world)) if world == 2 else None
    return [run_case(**case) for case in cases], extra


def check(results, cases):
    if results[0][1] is not None:
        for _, (odd, _) in results:
            assert "sequence length 47 is not divisible by the tensor-parallel degree" in odd, odd
        a, b = results[0][1][1], results[1][1][1]
        for replicated in ("flow_in.weight", "flow_start", "units.0.flow_layer.mlp.gate_up.weight"):
            assert torch.equal(a[replicated], b[replicated]), f"{replicated} differs across TP ranks"
        for sharded in ("units.0.vlm_layers.0.self_attn.qkv.weight", "embed_tokens.weight"):
            assert not torch.equal(a[sharded], b[sharded]), f"{sharded}: shards are the same draw"
        assert abs(float(a["q_full_std"]) - 0.02) < 0.004 and float(a["adapter.2.bias"].abs().max()) == 0.0
    results = [r for r, _ in results]
    for case, r in zip(cases, results[0]):
        assert r["keys_match"] and r["grad_names_match"] and r["n_grads"] > 35, (case, r)
        assert r["sharded"], (case, "the flow MLP was not split")
        assert {"ColumnParallelLinear", "RowParallelLinear", "ParallelRMSNorm", "VocabParallelEmbedding"} <= r["kinds"], r["kinds"]
        assert ("ReplicatedKVLinear" in r["kinds"]) == (case["tp"] == 4 and not case.get("tarflow")), r["kinds"]
        assert ("SequenceSplit" in r["kinds"]) == case["sp"], r["kinds"]
        # the Pretzel skips: replicated, moving no activation (SP: each rank's tokens; without SP plain nn.Linear)
        assert ("SequenceParallelLinear" in r["kinds"]) == (case["sp"] and not case.get("tarflow")), r["kinds"]
        # parallel.tp_overlap: the o_proj and down_proj of every unit block (tiny: 4 VLM + 2 flow) launch their
        # reduction for the halves to wait
        assert r["deferred"] == (12 if case.get("tp_overlap") else 0), (case, r)
        assert r["loss"] < TOL, (case, r)
        assert r["grad"] < TOL, (case, r)
        assert r["weight"] < TOL, (case, r)
    for rank_results in results[1:]:  # every rank saw the same numbers
        for a, b in zip(results[0], rank_results):
            assert abs(a["loss"] - b["loss"]) < TOL


CASES_2 = [
    dict(tp=2, sp=False),
    dict(tp=2, sp=True, path="materialised"),
    dict(tp=2, sp=True, tied=True),
    dict(tp=2, sp=False, flow_tp=1, path="materialised"),
    dict(tp=2, sp=False, tarflow=True),
    dict(tp=2, sp=True, tarflow=True),
    dict(tp=2, sp=True, tied=True, async_tp=True),  # collectives overlapped with the GEMMs (parallel/async_tp.py)
    dict(tp=2, sp=False, async_tp=True),  # the input gradient's all-reduce overlapped with dW's GEMM
    # batch halves: each half's row-parallel all-reduce / reduce-scatter in flight during the other's compute
    dict(tp=2, sp=False, async_tp=True, tp_overlap=2),
    dict(tp=2, sp=True, tied=True, tp_overlap=2),
    dict(tp=2, sp=False, tp_overlap=4),  # 4 chunks do not divide the 2 rows: the whole batch, waited at once
    dict(tp=2, sp=False, tp_overlap=2, flex=True),  # the BlockMask split per chunk (its rule shifted to the rows)
]
CASES_4 = [dict(tp=4, sp=False, shallow_heads=4), dict(tp=4, sp=True, shallow_heads=4),
           dict(tp=4, sp=True, shallow_heads=4, async_tp=True)]  # + k/v heads replicated, chunks over 4 ranks


def test_tp2_equals_single_process():
    """Also: SP on an odd length is a clear error; init_tp_weights draws independent shards and keeps
    replicated (and flow_tp=1 replicated flow) weights equal across ranks."""
    check(run_distributed(_worker, 2, CASES_2), CASES_2)


def test_tp4_equals_single_process_kv_heads_replicated():
    """tiny_config has 2 key/value heads: at TP=4 each is replicated on 2 ranks."""
    check(run_distributed(_worker, 4, CASES_4), CASES_4)
