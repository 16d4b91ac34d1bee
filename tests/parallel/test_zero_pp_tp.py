"""ZeRO-1 composed with pipeline and tensor parallelism, on 4 real gloo processes.

Contract (the cases of tests/parallel/test_zero.py, with PP or TP): DP2xPP2 (our 1F1B schedule, two
micro-batches, with untied and with tied embeddings) and DP2xTP2 (flow stream split too, or
replicated: flow_tp=1), loaded from the single-process
model's state dict, give the same loss and gradient norm over 5 steps (1e-5; clipping active) as
the single-process run without ZeRO. So ZeRO partitions over the data-parallel group of each
tensor/pipeline coordinate only, reduces the schedule's accumulated gradients once per step, and
counts every element once in the clipping norm (TP shards on every rank, replicated parameters on
one, the tied LM-head copy not at all). Each rank holds ~1/DP of its coordinate's optimizer state;
save -> load -> continue is bit-identical; the resharding reader (`read_full_state`) joins DP pieces,
TP shards and PP stages back into the single-process fp32 weights and AdamW moments, by name.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from parallel.topology import Topology
from tests.distributed import run_distributed
from tests.parallel.test_zero import check_case, check_full_state, deepspeed_ops, zero_config  # noqa: F401 (fixture)


def _tied(cfg):
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vlm=dataclasses.replace(cfg.model.vlm, tie_embeddings=True)))


def _world4(rank, world, root):
    root = Path(root)
    pp2 = Topology(pp=2)
    assert pp2.dp == 2
    out = {"pp": check_case(zero_config(1, pp=2, micro_batches=2), pp2, root / "pp"),
           "pp_tied": check_case(_tied(zero_config(1, pp=2, micro_batches=2)), pp2, root / "pp_tied")}
    tp2 = Topology(tp=2)
    out["tp"] = check_case(zero_config(1, tp=2), tp2, root / "tp")
    tp2_flow1 = Topology(tp=2, flow_tp=1)  # flow weights replicated over the TP group: counted once
    out["tp_flow1"] = check_case(zero_config(1, tp=2, flow_tp=1), tp2_flow1, root / "tp_flow1")
    return out


def test_zero1_dp2_pp2_and_dp2_tp2_equal_one_process(tmp_path):
    results = run_distributed(_world4, 4, str(tmp_path))
    for case in ("pp", "pp_tied", "tp", "tp_flow1"):
        ref = results[0][case]["ref_at_save"]
        if case == "pp_tied":  # the last stage's LM head is a second copy of the tied embedding
            from parallel.zero_checkpoint import read_full_state
            full = read_full_state(tmp_path / case)
            for k in ("fp32", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(full["lm_head.weight"][k], full["embed_tokens.weight"][k], rtol=0, atol=0)
        check_full_state(tmp_path / case, ref, ignore=("lm_head.weight",) if case == "pp_tied" else ())
    by_stage = [results[r]["pp"]["bytes"] for r in range(4)]
    assert by_stage[0] == by_stage[1] and by_stage[2] == by_stage[3] and by_stage[0] != by_stage[2], by_stage
