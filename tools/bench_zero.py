"""ZeRO benchmark: optimizer state and memory per GPU, and step time, with and without ZeRO.

    torchrun --nproc_per_node 2 tools/bench_zero.py --device cuda --config configs/h200_1b.yaml   # NCCL
    torchrun --nproc_per_node 4 tools/bench_zero.py --device cuda --config configs/bench_tp.yaml --pp 2
    torchrun --nproc_per_node 2 tools/bench_zero.py --device cpu --tiny                           # gloo

The world is tp x pp x dp (dp what --tp and --pp leave). Rows (--stages, default 0,1): stage 0 is
the path without ZeRO: fp32 weights, AdamW on every rank, gradients all-reduced over DP (train.py's
PlainEngine at PP=1, our pipeline schedule + GradBuckets at PP>1), bf16 autocast with --dtype bf16.
Stages 1-3 are parallel/zero.py's ZeroEngine: bf16 weights and gradients with --dtype bf16, fp32
master weights and AdamW moments sharded over DP. Every row builds the same model (seed 0), runs
--warmup + --steps full training steps (forward, backward, reduce, clip, AdamW) on the same
synthetic interleaved batch (tests/helpers.make_batch, --rows on every data-parallel rank) and reports
rank 0's: optimizer-state bytes (AdamW moments, + fp32 master for ZeRO), model-state memory (CUDA
memory held after a step, over what was held before the row was built: weights, gradients left,
optimizer state) and peak memory over the same baseline, median step time, tokens/s per GPU.
Theory per trainable parameter: without ZeRO 16 bytes (4 weight, 4 gradient, 8 moments); ZeRO-1
in bf16 4 + 12/dp (2 weight, 2 gradient; master and moments over dp).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_args import bench_args  # noqa: E402
from megaflow.model.starflow import STARFlow2, apply_stage  # noqa: E402
from parallel.topology import ParallelConfig, Topology  # noqa: E402
from tests.helpers import make_batch, make_noise  # noqa: E402  (the synthetic interleaved batch)


def parse_args(argv=None):
    p = bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (ZeRO-1 only)")
    p.add_argument("--micro-batches", type=int, default=0, help="micro-batches per step (0: pp, or 1)")
    p.add_argument("--stages", default="0,1", help="ZeRO stages to run, comma-separated (0 = without ZeRO)")
    p.add_argument("--rows", type=int, default=0, help="rows per data-parallel rank (0: data.batch_size)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", default="", help="also write the results here (rank 0)")
    return p.parse_args(argv)


def load(args, world: int):
    """Our Config with the parallel section set from the command line; rows and sequence length."""
    from megaflow.config import Config, load_config
    if args.tiny:
        from data_pipeline.config import DataConfig
        from tests.helpers import tiny_config
        cfg = Config(model=dataclasses.replace(tiny_config(), stage="all"),
                     data=DataConfig(image_size=8, channels=1, patch_size=2, seq_len=48, batch_size=2, max_images=2))
    else:
        cfg = load_config(args.config, args.set)
    m = args.micro_batches or (args.pp if args.pp > 1 else 1)
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(tp=args.tp, pp=args.pp, micro_batches=m))
    return cfg, args.rows or cfg.data.batch_size, cfg.data.seq_len, cfg.data.max_images


def build(cfg, topo, device, stage: int, dtype):
    """The build order (meta -> TP -> PP split -> materialise + init -> engine) for one row."""
    from parallel.tensor_parallel import build_tp_model
    p = dataclasses.replace(cfg.parallel, zero_stage=stage)
    cfg = dataclasses.replace(cfg, parallel=p)
    autocast = dtype if device.type == "cuda" and dtype != torch.float32 else None
    if p.pp == 1:
        model = build_tp_model(cfg.model, topo, p, device, seed=0)
        if stage == 0:
            from megaflow.train import PlainEngine
            return PlainEngine(model, cfg, autocast, topo.dp_group if topo.dp > 1 else None)
        from parallel.zero import ZeroEngine
        return ZeroEngine(model, cfg, dtype, topo)
    from parallel.pipeline import TiedEmbeddings, init_stages, split_stages
    with torch.device("meta"):
        model = STARFlow2(cfg.model)
    from parallel.tensor_parallel import apply_tp
    apply_tp(model, topo, p)
    apply_stage(model, cfg.model.stage)
    stages = split_stages(model, topo.pp, topo.pp_rank, p.schedule, p.virtual_stages, p.micro_batches, verbose=False)
    init_stages(model, stages, device, seed=0)
    tied = TiedEmbeddings(stages, topo)
    tied.broadcast()
    if stage == 0:
        return PipelinePlain(stages, cfg, autocast, topo, tied)
    from parallel.zero import ZeroEngine
    return ZeroEngine(None, cfg, dtype, topo, stages=stages, tied=tied)


class PipelinePlain:
    """The pipelined path without ZeRO: our schedule, bucketed DP all-reduce, local AdamW."""

    def __init__(self, stages, cfg, dtype, topo, tied):
        from megaflow.optim import build_optimizer
        from parallel.data_parallel import GradBuckets
        from parallel.pipeline import stage_parameters
        from parallel.pipeline_step import PipelineSchedule
        self.dtype, self.cfg = dtype, cfg
        self.params = stage_parameters(stages)
        self.schedule = PipelineSchedule(stages, topo, cfg.parallel.schedule, cfg.parallel.micro_batches, tied=tied)
        self.buckets = GradBuckets(self.params, topo.dp_group)
        self.optimizer = build_optimizer(torch.nn.ModuleList([st.module for st in stages]), cfg.train)

    def train_step(self, batch, noise, keep, lr):
        from megaflow.optim import set_lr
        set_lr(self.optimizer, lr)
        with torch.autocast(batch["tokens"].device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss, metrics = self.schedule.step(batch, noise, keep)
        self.buckets.all_reduce()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss), "grad_norm": float(norm), **metrics}


def optimizer_state_bytes(engine) -> int:
    if hasattr(engine, "optimizer_state_bytes"):
        return engine.optimizer_state_bytes()
    return sum(v.numel() * v.element_size() for st in engine.optimizer.state.values()
               for v in st.values() if torch.is_tensor(v) and v.numel() > 1)


def size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_row(cfg, topo, device, stage: int, dtype, batch, noise, args) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = allocated(device)
    engine = build(cfg, topo, device, stage, dtype)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        out = engine.train_step(batch, noise, None, 1e-5)
        sync(device)
        losses.append(float(out["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    held = allocated(device) - base
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else 0
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine_params(engine))
    row = dict(stage=stage, optimizer_state_bytes=optimizer_state_bytes(engine), model_state_bytes=held,
               peak_bytes=peak, step_ms=statistics.median(times) * 1e3, first_loss=losses[0],
               trainable_params_M=n_params / 1e6)
    if hasattr(engine, "engine") and hasattr(engine.engine, "destroy"):
        engine.engine.destroy()
    del engine
    dist.barrier()
    return row


def engine_params(engine):
    if hasattr(engine, "named"):
        return [p for p, _ in engine.named.values()]
    return [p for g in engine.optimizer.param_groups for p in g["params"]]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    topo = Topology(tp=args.tp, pp=args.pp)
    cfg, rows, T, M = load(args, world)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    # the same rows on every data-parallel rank: rank 0's loss is then the global loss in every row
    batch = {k: v.to(device) for k, v in make_batch(cfg.model, rows, T, M, seed=0).items()}
    noise = make_noise(cfg.model, batch).to(device)
    stages = [int(s) for s in args.stages.split(",")]
    if topo.rank == 0:
        print(f"world {world} = tp {topo.tp} x pp {topo.pp} x dp {topo.dp}, {rows} x {T} tokens per dp rank, "
              f"{args.dtype}, device {device.type}", flush=True)
    results = [run_row(cfg, topo, device, s, dtype, batch, noise, args) for s in stages]
    if topo.rank == 0:
        print(f"\n| ZeRO | trainable params/rank | optimizer state/rank | model state/GPU | peak/GPU | step ms "
              f"| tokens/s/GPU | first loss |\n|---|---|---|---|---|---|---|---|")
        for r in results:
            tps = rows * T * topo.dp / (r["step_ms"] / 1e3) / world
            r["tokens_per_s_per_gpu"] = tps
            name = "none" if r["stage"] == 0 else f"ZeRO-{r['stage']}"
            print(f"| {name} | {r['trainable_params_M']:.2f}M | {size(r['optimizer_state_bytes'])} | "
                  f"{size(r['model_state_bytes'])} | {size(r['peak_bytes'])} | {r['step_ms']:.1f} | {tps:.0f} | "
                  f"{r['first_loss']:.4f} |")
        print(f"(rank 0; median of {args.steps} steps after {args.warmup}; memory over the row's baseline, CUDA only)")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=results, world=world, tp=topo.tp, pp=topo.pp,
                                                       dp=topo.dp, dtype=args.dtype, device=device.type,
                                                       rows_per_dp=rows, seq_len=T), indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
