"""Pipeline x tensor (x data) parallelism on real gloo processes against one process.

Contract: TP2xPP2 (with and without sequence parallelism, 1F1B and interleaved) and DP2xTP2xPP2
(8 processes), built torchtitan's way (meta build -> apply_tp -> split_stages -> load the
single-process state dict, sliced per TP rank), give the single-process loss (1e-5), the same
first-step gradients once gathered over TP (1e-5 relative to each tensor's largest entry) and the
same weights after 3 AdamW steps, on the same global batch.
"""
import torch

from megaflow.model.starflow import STARFlow2, apply_stage
from parallel.checkpoint_tp import gather_full, load_full_state_dict
from parallel.data_parallel import GradBuckets
from parallel.pipeline import TiedEmbeddings, load_stages, split_stages, stage_parameters
from parallel.pipeline_step import PipelineSchedule
from parallel.tensor_parallel import apply_tp
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.parallel.test_pp_dist import STEPS, _config, _data, _optimizer, _reference
from tests.parallel.test_tp import rel_err

TOL = 1e-5


def _check_tp_case(topo, pcfg, cfg, m, no_image_rows=False):
    batch, noise = _data(cfg, no_image_rows)
    state, ref_losses, ref_grads, ref_weights = _reference(cfg, batch, noise)
    with torch.device("meta"):
        model = STARFlow2(cfg)
    apply_tp(model, topo, pcfg)
    apply_stage(model, cfg.stage)
    stages = split_stages(model, topo.pp, topo.pp_rank, pcfg.schedule, pcfg.virtual_stages, m, verbose=False)
    load_stages(stages, state, loader=lambda mod, sd: load_full_state_dict(mod, sd, strict=False))
    sched = PipelineSchedule(stages, topo, pcfg.schedule, m, tied=TiedEmbeddings(stages, topo))
    params = stage_parameters(stages)
    buckets = GradBuckets(params, topo.dp_group, bucket_mb=0.01)
    opt = _optimizer(params)
    rows = slice(topo.dp_rank * 4 // topo.dp, (topo.dp_rank + 1) * 4 // topo.dp)
    where = f"{topo} {pcfg}"
    worst = {"loss": 0.0, "grad": 0.0, "weight": 0.0}
    for step in range(STEPS):
        loss, _ = sched.step({k: t[rows] for k, t in batch.items()}, noise[rows])
        buckets.all_reduce()
        worst["loss"] = max(worst["loss"], abs(float(loss) - ref_losses[step]))
        if step == 0:
            for st in stages:
                grads = gather_full(st.module, {k: p.grad for k, p in st.module.named_parameters()})
                assert set(grads) == {k for k, _ in st.module.named_parameters()} & set(ref_grads), where
                worst["grad"] = max([worst["grad"]] + [rel_err(g, ref_grads[k]) for k, g in grads.items()])
        opt.step()
        opt.zero_grad()
    for st in stages:
        full = gather_full(st.module, dict(st.module.named_parameters()))
        worst["weight"] = max([worst["weight"]] + [float((w - ref_weights[k]).abs().max()) for k, w in full.items()])
    assert max(worst.values()) < TOL, (where, worst)
    return worst


def _tp2_pp2(rank, world, dp):
    out = []
    for sp, schedule, v, m in [(False, "1f1b", 1, 2), (True, "interleaved", 2, 2)]:
        pcfg = ParallelConfig(tp=2, pp=2, sequence_parallel=sp, schedule=schedule, virtual_stages=v, micro_batches=m)
        topo = Topology(tp=2, pp=2)
        assert topo.dp == dp
        out.append(_check_tp_case(topo, pcfg, _config(4), m, no_image_rows=sp))
        if dp == 2:
            break  # one DP2xTP2xPP2 case: 8 processes on 2 cores are slow
    return out


def test_tp2_pp2_equals_one_process():
    run_distributed(_tp2_pp2, 4, 1)


def test_dp2_tp2_pp2_equals_one_process():
    run_distributed(_tp2_pp2, 8, 2)
