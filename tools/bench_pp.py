"""Pipeline benchmark: measured bubble fraction against theory, step time and memory per stage.

    torchrun --nproc_per_node 2 tools/bench_pp.py --device cpu               # gloo, CPU
    torchrun --nproc_per_node 2 tools/bench_pp.py --device cuda --dtype bf16 \
        --dim 2048 --units 8 --seq-len 2048 --mb-rows 1                      # NCCL, one GPU per rank

For every schedule and micro-batch count m (fixed micro-batch size, so the global batch grows with
m) it times `--steps` steps, then records `--steps` more with a per-action timeline (on CUDA that
synchronises around every action, so those are not timed): the bubble of a rank is the median over
them of 1 - (time spent computing forwards and backwards) / (step time). Theory: (p-1)/(m+p-1) for 1F1B,
the bubble time divided by v for interleaved: ((p-1)/v)/(m+(p-1)/v). "Simulated" replays the same
schedule (parallel/schedules.py) with the measured mean forward/backward time of every stage and
free communication: theory plus stage imbalance; the rest of the gap to "measured" is transport
latency and host overhead. On CUDA it also reports the
peak memory of each stage. The world is pp x dp; the synthetic batch is text + one image per row.
Prints a markdown table (rank 0) and writes `--json` if given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaflow.model.config import FlowConfig, ModelConfig, SpecialTokens, VLMConfig  # noqa: E402
from megaflow.model.fae import FAEConfig  # noqa: E402
from megaflow.model.starflow import STARFlow2, apply_stage  # noqa: E402
from parallel.pipeline import TiedEmbeddings, init_stages, split_stages, stage_parameters  # noqa: E402
from parallel.pipeline_comm import PipelineComm  # noqa: E402
from parallel.pipeline_step import PipelineSchedule  # noqa: E402
from parallel.schedules import simulate, theory_bubble  # noqa: E402
from parallel.topology import Topology  # noqa: E402

TOKENS = SpecialTokens(pad_id=1000, bos_id=1001, eos_id=1002, boi_id=1003, eoi_id=1004, image_id=1005)


def model_config(a) -> ModelConfig:
    heads = max(a.dim // 128, 2) if a.dim >= 256 else 4
    vlm = VLMConfig(vocab_size=1024, dim=a.dim, n_layers=a.units, n_heads=heads, n_kv_heads=max(heads // 4, 1),
                    ffn_dim=a.dim * 3)
    flow = FlowConfig(dim=a.dim, n_heads=heads, ffn_dim=a.dim * 3, n_layers=a.units, ratio=1, n_shallow=2,
                      shallow_layers=1, shallow_dim=64, shallow_heads=2)
    fae = FAEConfig(mode="pixels", image_size=a.image_size, channels=3, patch_size=4)
    return ModelConfig(vlm=vlm, flow=flow, fae=fae, tokens=TOKENS, stage="all")


def synthetic_batch(cfg: ModelConfig, rows: int, T: int, device) -> dict:
    """[bos, 8 text, boi, N image slots, eoi, text..., eos] per row."""
    g = torch.Generator().manual_seed(0)
    t, N = cfg.tokens, cfg.fae.n_tokens
    if T < N + 12:
        raise ValueError(f"--seq-len {T} is too short for an image of {N} tokens")
    tokens = torch.randint(0, 1000, (rows, T), generator=g)
    image_mask = torch.zeros(rows, T, dtype=torch.bool)
    tokens[:, 0], tokens[:, 9], tokens[:, 10 + N], tokens[:, -1] = t.bos_id, t.boi_id, t.eoi_id, t.eos_id
    tokens[:, 10:10 + N] = t.image_id
    image_mask[:, 10:10 + N] = True
    targets = torch.where(image_mask.roll(-1, 1) | image_mask, -100, tokens.roll(-1, 1))
    targets[:, -1] = -100
    H = cfg.fae.image_size
    batch = dict(tokens=tokens, targets=targets, position_ids=torch.arange(T).expand(rows, T).clone(),
                 doc_ids=torch.zeros(rows, T, dtype=torch.long), image_mask=image_mask,
                 images=torch.rand(rows, 1, 3, H, H, generator=g) * 2 - 1,
                 image_valid=torch.ones(rows, 1, dtype=torch.bool))
    noise = torch.randn(rows, 1, N, cfg.fae.latent_dim, generator=g)
    return {k: v.to(device) for k, v in batch.items()}, noise.to(device)


def run_one(a, cfg, topo, comm, schedule: str, m: int, device, dtype) -> dict:
    v = a.virtual_stages if schedule == "interleaved" else 1
    with torch.device("meta"):
        model = STARFlow2(cfg).to(dtype)
    apply_stage(model, cfg.stage)
    stages = split_stages(model, topo.pp, topo.pp_rank, schedule, v, m, seq_len=a.seq_len, verbose=a.verbose)
    init_stages(model, stages, device, seed=0)
    del model
    sched = PipelineSchedule(stages, topo, schedule, m, comm=comm, tied=TiedEmbeddings(stages, topo))
    params = stage_parameters(stages)
    batch, noise = synthetic_batch(cfg, m * a.mb_rows, a.seq_len, device)
    batch["images"], noise = batch["images"].to(dtype), noise.to(dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, bubbles, timeline = [], [], []
    for step in range(a.warmup + 2 * a.steps):
        sched.record = step >= a.warmup + a.steps  # timed steps first, then steps with a per-action timeline
        _sync(device)
        t0 = time.perf_counter()
        sched.step(batch, noise)
        _sync(device)
        t1 = time.perf_counter()
        for p in params:
            p.grad = None
        if a.warmup <= step < a.warmup + a.steps:
            times.append(t1 - t0)
        elif sched.record:
            bubbles.append(1.0 - sum(end - start for _, start, end in sched.timeline) / (t1 - t0))
            timeline += sched.timeline
    bubble = statistics.median(bubbles)
    cost = {(k, c): statistics.mean(e - s for x, s, e in timeline if (x.kind, x.chunk) == (k, c))
            for k in "FB" for c in range(v)}
    out = {"rank": topo.pp_rank, "step_s": statistics.median(times), "bubble": bubble, "cost": cost,
           "mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
           "params_m": sum(p.numel() for p in params) / 1e6}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    ranks = every[:topo.pp]
    stage_cost = {k: [ranks[s % topo.pp]["cost"][(k, s // topo.pp)] for s in range(topo.pp * v)] for k in "FB"}
    return {"schedule": schedule, "v": v, "m": m, "ranks": ranks, "theory": theory_bubble(topo.pp, m, v),
            "simulated": simulate(schedule, topo.pp, m, v, stage_cost["F"], stage_cost["B"])["bubble"]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--pp", type=int, default=0, help="pipeline degree (default: the whole world)")
    p.add_argument("--schedules", default="1f1b,interleaved")
    p.add_argument("--micro-batches", default="1,2,4,8")
    p.add_argument("--virtual-stages", type=int, default=2)
    p.add_argument("--dim", type=int, default=128, help="hidden size of both streams")
    p.add_argument("--units", type=int, default=8, help="Pretzel units (1 VLM + 1 flow layer each)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--image-size", type=int, default=16, help="pixels; 4x4 patches -> (size/4)^2 image tokens")
    p.add_argument("--mb-rows", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default="")
    p.add_argument("--verbose", action="store_true", help="print the stage layout")
    a = p.parse_args(argv)
    backend = "nccl" if a.device == "cuda" else "gloo"
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    topo = Topology(pp=a.pp or dist.get_world_size())
    cfg = model_config(a)
    schedules = a.schedules.split(",")
    comm = PipelineComm(topo, interleaved="interleaved" in schedules)
    results = []
    for schedule in schedules:
        for m in (int(x) for x in a.micro_batches.split(",")):
            if schedule == "interleaved" and m % topo.pp:
                continue
            results.append(run_one(a, cfg, topo, comm, schedule, m, device, dtype))
    if dist.get_rank() == 0:
        print(f"pp={topo.pp} dp={topo.dp} device={a.device} dtype={a.dtype} dim={a.dim} units={a.units} "
              f"seq_len={a.seq_len} mb_rows={a.mb_rows} image_tokens={cfg.fae.n_tokens}")
        print("| schedule | v | m | step (s) | bubble measured (mean of ranks) | bubble theory | bubble simulated "
              "from measured stage times | per rank: bubble, peak memory (GiB), params (M) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            ranks = r["ranks"]
            per = "; ".join(f"{x['bubble']:.3f}, " + (f"{x['mem_gib']:.2f}" if x["mem_gib"] is not None else "-")
                            + f", {x['params_m']:.1f}" for x in ranks)
            print(f"| {r['schedule']} | {r['v']} | {r['m']} | {max(x['step_s'] for x in ranks):.4f} | "
                  f"{statistics.mean(x['bubble'] for x in ranks):.3f} | {r['theory']:.3f} | {r['simulated']:.3f} | {per} |")
        if a.json:
            with open(a.json, "w") as f:
                for r in results:
                    for x in r["ranks"]:
                        x["cost"] = {f"{k}{c}": t for (k, c), t in x["cost"].items()}
                json.dump({"args": vars(a), "results": results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
