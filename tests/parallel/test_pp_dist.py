"""Pipeline (x data) parallelism on real gloo processes against one process.

Contract: for every layout below, every rank's stage parameters, loaded from the single-process
model's state dict, get the same loss (1e-5), the same first-step gradients (1e-5) and, after 3
AdamW steps, the same weights (1e-5) as the single-process model trained on the same global batch.
Cases cover 1F1B and interleaved schedules (2 and 4 chunks a rank) at PP=2 and PP=4, DP2xPP2 with the bucketed gradient
all-reduce, a DP-only run with many small buckets, tied embeddings across the first and last stage,
the stateless `allreduce_gradients` averages,
and a step whose second micro-batch holds no image at all (frozen VLM: some boundary tensors need
no gradient) - which must neither hang nor differ. Generation through PP=2 (1F1B and interleaved
chunks) gives the same text and the same images as one process (sequential and Jacobi sampling,
and the score-based denoise step, whose gradient runs back through the stages). The benchmark's
measurement (tools/bench_pp.py) runs.
"""
import argparse
import dataclasses

import torch

from megaflow.model.generate import sample_images, sample_text
from megaflow.model.starflow import STARFlow2, apply_stage, build_model
from parallel.data_parallel import GradBuckets, allreduce_gradients
from parallel.pipeline import TiedEmbeddings, load_stages, split_stages, stage_parameters
from parallel.pipeline_comm import PipelineComm
from parallel.pipeline_generate import PipelinedModel
from parallel.pipeline_step import PipelineSchedule
from parallel.topology import Topology
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config

STEPS, LR, TOL = 3, 1e-3, 1e-5


def _config(n_layers: int, stage: str = "all", tie: bool = False):
    cfg = tiny_config(n_layers=n_layers)
    return dataclasses.replace(cfg, stage=stage, vlm=dataclasses.replace(cfg.vlm, tie_embeddings=tie))


def _data(cfg, no_image_rows: bool = False):
    batch = make_batch(cfg, 4, 48)
    if no_image_rows:  # rows 2, 3 become text only: the second of two micro-batches has no image
        batch["tokens"][2:][batch["image_mask"][2:]] = 7
        batch["image_mask"][2:] = False
        batch["image_valid"][2:] = False
        batch["images"][2:] = 0
    return batch, make_noise(cfg, batch)


def _optimizer(params):
    # eps=1e-5, not 1e-8: Adam divides by sqrt(v) + eps, so with eps=1e-8 an element whose gradient
    # is ~1e-8 (zero-initialised skips) turns fp32 summation-order noise into a +-lr step.
    return torch.optim.AdamW(params, lr=LR, eps=1e-5, weight_decay=0.1)


def _reference(cfg, batch, noise):
    model = build_model(cfg, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _optimizer([p for p in model.parameters() if p.requires_grad])
    losses, grads = [], {}
    for step in range(STEPS):
        loss, _ = model(batch, noise)
        loss.backward()
        losses.append(float(loss.detach()))
        if step == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return state, losses, grads, dict(model.named_parameters(remove_duplicate=False))


def _pipelined_stages(cfg, topo, schedule, v, m, state):
    with torch.device("meta"):
        model = STARFlow2(cfg)
    apply_stage(model, cfg.stage)
    stages = split_stages(model, topo.pp, topo.pp_rank, schedule, v, m, verbose=False)
    load_stages(stages, state)
    return stages


def _check_case(topo, cfg, schedule="1f1b", v=1, m=1, no_image_rows=False, bucket_mb=25.0):
    batch, noise = _data(cfg, no_image_rows)
    state, ref_losses, ref_grads, ref_weights = _reference(cfg, batch, noise)
    stages = _pipelined_stages(cfg, topo, schedule, v, m, state)
    tied = TiedEmbeddings(stages, topo)
    sched = PipelineSchedule(stages, topo, schedule, m, tied=tied)
    params = stage_parameters(stages)
    buckets = GradBuckets(params, topo.dp_group, bucket_mb=bucket_mb)
    opt = _optimizer(params)
    rows = slice(topo.dp_rank * 4 // topo.dp, (topo.dp_rank + 1) * 4 // topo.dp)
    local = {k: t[rows] for k, t in batch.items()}
    named = {k: p for st in stages for k, p in st.module.named_parameters()}
    where = f"{topo} {schedule} v={v} m={m}"
    for step in range(STEPS):
        loss, metrics = sched.step(local, noise[rows])
        buckets.all_reduce()
        assert abs(float(loss) - ref_losses[step]) < TOL, (where, step, float(loss), ref_losses[step])
        assert "flow_nll" in metrics and "text_loss" in metrics, metrics
        if step == 0:
            assert set(k for k, p in named.items() if p.grad is not None) == set(ref_grads) & set(named), where
            for k, p in named.items():
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, ref_grads[k], rtol=0, atol=TOL, msg=lambda s: f"{where} grad {k}: {s}")
        opt.step()
        opt.zero_grad()
    for k, p in named.items():
        torch.testing.assert_close(p.detach(), ref_weights[k].detach(), rtol=0, atol=TOL, msg=lambda s: f"{where} weight {k}: {s}")
    return len(named), len(buckets.buckets)


def _check_generation(topo, schedule, v):
    cfg = _config(4)
    ref = build_model(cfg, seed=0)
    with torch.no_grad():  # make the zero-initialised heads and skips matter
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    stages = _pipelined_stages(cfg, topo, schedule, v, topo.pp, ref.state_dict())
    piped = PipelinedModel(stages, topo)
    prompts = [[cfg.tokens.bos_id, 3, 4], [cfg.tokens.bos_id, 9]]
    assert sample_text(piped, prompts, max_new_tokens=5) == sample_text(ref, prompts, max_new_tokens=5)
    got, _ = sample_images(piped, prompts, guidance=1.0, seed=3, do_denoise=False)
    want, _ = sample_images(ref, prompts, guidance=1.0, seed=3, do_denoise=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got, _ = sample_images(piped, prompts, guidance=1.0, seed=3)  # the denoise step's gradient through the stages
    want, _ = sample_images(ref, prompts, guidance=1.0, seed=3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got, _ = sample_images(piped, prompts, guidance=1.0, seed=3, do_denoise=False, method="jacobi", chunk=8)
    want, _ = sample_images(ref, prompts, guidance=1.0, seed=3, do_denoise=False, method="jacobi", chunk=8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _bench_smoke(topo):
    """tools/bench_pp.py's measurement runs and reports bubbles in [0, 1] and a finite step time."""
    from tools import bench_pp
    args = argparse.Namespace(dim=32, units=4, image_size=8, seq_len=32, mb_rows=1, virtual_stages=2, warmup=0,
                              steps=1, verbose=False)
    cfg = bench_pp.model_config(args)
    r = bench_pp.run_one(args, cfg, topo, PipelineComm(topo, interleaved=True), "interleaved", 2,
                         torch.device("cpu"), torch.float32)
    assert r["theory"] == 0.2 and 0.0 <= r["simulated"] < 1.0, r
    assert all(0.0 <= x["bubble"] < 1.0 and x["step_s"] > 0 for x in r["ranks"]), r


def _check_allreduce_average(topo):
    """The stateless `allreduce_gradients` (plain engine, per-rank loss normalisation) leaves the mean
    of the ranks' gradients on every rank."""
    cfg = _config(2)
    batch, noise = _data(cfg)
    models = [build_model(cfg, seed=0) for _ in range(topo.dp)]
    for d, model in enumerate(models):  # every rank's local gradient, computed here for the check
        rows = slice(d * 4 // topo.dp, (d + 1) * 4 // topo.dp)
        model({k: t[rows] for k, t in batch.items()}, noise[rows])[0].backward()
    want = {name: sum(dict(m.named_parameters())[name].grad for m in models) / topo.dp
            for name, p in models[0].named_parameters() if p.grad is not None}
    mine = models[topo.dp_rank]
    allreduce_gradients([p for p in mine.parameters() if p.requires_grad], topo.dp_group, bucket_mb=0.005)
    assert {n for n, p in mine.named_parameters() if p.grad is not None} == set(want)
    for name, p in mine.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[name], rtol=0, atol=1e-6, msg=name)


def _world2(rank, world):
    pp2 = Topology(pp=2)
    out = [_check_case(pp2, _config(4), "1f1b", 1, 1),
           _check_case(pp2, _config(4), "1f1b", 1, 4),
           _check_case(pp2, _config(4), "interleaved", 2, 4),
           _check_case(pp2, _config(8), "interleaved", 4, 4),  # 4 chunks a rank, one unit each (bubble 1/(4m+1))
           _check_case(pp2, _config(4, tie=True), "1f1b", 1, 2),
           _check_case(pp2, _config(4, stage="t2i"), "1f1b", 1, 2, no_image_rows=True),
           _check_case(Topology(pp=1), _config(2), "1f1b", 1, 2, bucket_mb=0.005)]
    assert out[-1][1] > 3, out  # many buckets really exercised
    _check_allreduce_average(Topology(pp=1))
    _check_generation(pp2, "1f1b", 1)
    _check_generation(pp2, "interleaved", 2)
    _bench_smoke(pp2)
    return out


def _world4(rank, world):
    pp4 = Topology(pp=4)
    dp2pp2 = Topology(pp=2)
    assert dp2pp2.dp == 2
    return [_check_case(pp4, _config(8), "1f1b", 1, 4),
            _check_case(pp4, _config(8), "interleaved", 2, 4),
            _check_case(dp2pp2, _config(4), "1f1b", 1, 2),
            _check_case(dp2pp2, _config(4), "interleaved", 2, 2, no_image_rows=True)]


def test_pp2_schedules_tied_mixed_dp_and_generation_equal_one_process():
    run_distributed(_world2, 2)


def test_pp4_and_dp2_pp2_equal_one_process():
    run_distributed(_world4, 4)
