"""Scaling on 2 processes (issue 17): one GPU vs DP=2, TP=2, TP=2+SP and PP=2 on one config, with a
per-rank breakdown of each layout's step (compute, exposed communication, pipeline wait, idle).

    torchrun --nproc_per_node 2 tools/bench_scaling.py --config configs/h200_1b.yaml --json $OUT/s.json
    torchrun --nproc_per_node 2 tools/bench_scaling.py --tiny --device cpu                  # gloo smoke

Every layout is built as `megaflow train` builds it (parallel/runtime.py: meta -> TP -> PP split ->
init -> engine; the one-GPU rows: megaflow.train.PlainEngine in each process on its own) and runs
full training steps (forward, backward, gradient reduction, clip, AdamW) on the same synthetic
batch of --rows rows: each rank of a DP layout gets --rows rows (weak scaling), the TP and PP
layouts share one batch of --rows rows (strong scaling; PP splits it into --micro-batches).
Rows (--modes, comma-separated; `name@a.b=v;c.d=w` adds config overrides, e.g. tp2@train.compile=on):

    one     one GPU, one backward per step (PlainEngine): the baseline of DP and TP
    one_mb  one GPU, --micro-batches accumulated (ParallelEngine, no peers): PP's baseline
    dp2     data parallel; efficiency = tokens/s per GPU / one's (weak scaling)
    tp2     tensor parallel; efficiency = one's step / (2 x step) (strong scaling)
    tp2sp   tensor + sequence parallel; same efficiency
    pp2     1F1B over --micro-batches; efficiency = one_mb's step / (2 x step); bubble = 1 - that,
            against theory (p-1)/(m+p-1)
    config  the config's own parallel section, as is (what `torchrun ... megaflow profile` runs)

Every row runs in the same processes, after `torch._dynamo.reset()` (no compile cache carried over).
Step time: median of --steps after --warmup (CUDA synchronised around each step). Then --profile
steps under torch.profiler give each rank's breakdown (parallel/rank_profile.py) and, with
--trace DIR, one Chrome trace per rank and layout. Not a training loop: no data loading.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_args import bench_args  # noqa: E402
from parallel.rank_profile import clock, format_ranks, gather_ranks, profile_steps  # noqa: E402
from parallel.topology import ParallelConfig, Topology  # noqa: E402
from tests.helpers import make_batch, make_noise  # noqa: E402  (the synthetic interleaved batch)

LAYOUTS = {"one": {}, "one_mb": {}, "dp2": {}, "tp2": {"tp": 2}, "tp2sp": {"tp": 2, "sequence_parallel": True},
           "pp2": {"pp": 2}, "config": None}


def parse_args(argv=None):
    p = bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--modes", default="one,dp2,tp2,tp2sp,one_mb,pp2", help="rows, comma-separated (see above)")
    p.add_argument("--rows", type=int, default=0, help="rows per step (per rank under DP; 0: data.batch_size)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches of one_mb and pp2")
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--profile", type=int, default=2, help="profiled steps per row (0: no breakdown)")
    p.add_argument("--profile-rows", default="", help="profile only these rows (comma-separated names; '' = all)")
    p.add_argument("--trace", default="", help="write DIR/<row>.rank<r>.json Chrome traces")
    p.add_argument("--json", default="", help="also write the results here (rank 0)")
    return p.parse_args(argv)


def row_config(args, mode: str):
    """(name, Config) of one row: the base config, --set, the layout and the row's own overrides."""
    from megaflow.config import Config, load_config
    name, _, extra = mode.partition("@")
    if name not in LAYOUTS:
        raise SystemExit(f"--modes: unknown row {name!r}; choose from {', '.join(LAYOUTS)}")
    sets = args.set + [s for s in extra.split(";") if s]
    if args.tiny:
        from data_pipeline.config import DataConfig
        from tests.helpers import tiny_config
        base = Config(model=dataclasses.replace(tiny_config(), stage="all"),
                      data=DataConfig(image_size=8, channels=1, patch_size=2, seq_len=48, batch_size=2, max_images=2))
        cfg = load_config(None, sets) if sets else Config()
        cfg = dataclasses.replace(cfg, model=base.model, data=base.data)
    else:
        cfg = load_config(args.config, sets)
    if LAYOUTS[name] is None:
        return name, cfg
    m = args.micro_batches if name in ("one_mb", "pp2") else 1
    par = dataclasses.replace(cfg.parallel, micro_batches=m, **LAYOUTS[name])
    return name, dataclasses.replace(cfg, parallel=par)


def build(name: str, cfg, device, dtype):
    """(engine, topology) of one row, built as megaflow train builds it."""
    from parallel.runtime import build_engine, build_stages
    if name == "one":
        from megaflow.model.starflow import build_model
        from megaflow.train import PlainEngine
        return PlainEngine(build_model(cfg.model, device, seed=0), cfg, dtype), None
    p = cfg.parallel
    topo = Topology(tp=p.tp, pp=p.pp) if name != "one_mb" else Topology(rank=0, world_size=1)
    model, stages, tied = build_stages(cfg.model, p, topo, device, 0, None, cfg.data.seq_len)
    return build_engine(cfg, model, stages, tied, topo, dtype), topo


def run_row(args, mode: str, device, batch: dict, noise) -> dict:
    name, cfg = row_config(args, mode)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and device.type == "cuda" else None
    gc.collect()
    # each row starts with empty compile caches: rows of other shapes (TP's fewer heads per rank, PP's
    # 1-row micro-batches) would otherwise exhaust the recompile limit of the compiled FlexAttention
    # (megaflow/model/masks.py, dynamic=False), which then runs eagerly and several times slower
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine, topo = build(name, cfg, device, dtype)
    times = []
    step = lambda: engine.train_step(batch, noise, None, 1e-5)  # noqa: E731
    for i in range(args.warmup + args.steps):
        t0 = clock(device)
        out = step()
        float(out["loss"])
        if i >= args.warmup:
            times.append(clock(device) - t0)
    prof = None
    if args.profile and (not args.profile_rows or name in args.profile_rows.split(",")):
        trace = f"{args.trace}/{mode.replace('@', '_').replace(';', '_')}.rank{dist.get_rank()}.json" if args.trace else None
        prof = profile_steps(step, args.profile, device, trace)
    row = dict(mode=mode, step_s=statistics.median(times), loss=float(out["loss"]),
               peak_GiB=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0)
    del engine, out
    ranks = gather_ranks(dict(row, profile=prof))
    dist.barrier()
    return dict(row, step_s=max(r["step_s"] for r in ranks), ranks=ranks, name=name,
                tokens=args.rows * cfg.data.seq_len, m=cfg.parallel.micro_batches)


def efficiencies(rows: list) -> None:
    """Add 'efficiency' (and 'bubble' for pp2) against the baselines measured in the same run."""
    base = {r["name"]: r["step_s"] for r in rows if r["name"] in ("one", "one_mb")}
    for r in rows:
        if r["name"] == "dp2" and "one" in base:
            r["efficiency"] = base["one"] / r["step_s"]  # same tokens per GPU
        elif r["name"] in ("tp2", "tp2sp") and "one" in base:
            r["efficiency"] = base["one"] / (2 * r["step_s"])
        elif r["name"] == "pp2" and "one_mb" in base:
            r["efficiency"] = base["one_mb"] / (2 * r["step_s"])
            r["bubble"], r["bubble_theory"] = 1 - r["efficiency"], 1 / (r["m"] + 1)


def report(rows: list) -> str:
    out = ["| row | step ms | tokens/s per GPU | efficiency | bubble (theory) | peak GiB (rank 0) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        gpus = 1 if r["name"] in ("one", "one_mb") else 2
        per_gpu = r["tokens"] * (2 if r["name"] == "dp2" else 1) / r["step_s"] / gpus
        eff = f"{r['efficiency']:.1%}" if "efficiency" in r else "-"
        bub = f"{r['bubble']:.3f} ({r['bubble_theory']:.3f})" if "bubble" in r else "-"
        out.append(f"| {r['mode']} | {r['step_s'] * 1e3:.1f} | {per_gpu:.0f} | {eff} | {bub} | {r['peak_GiB']:.1f} |")
    for r in rows:
        if r["ranks"][0]["profile"]:
            out += ["", f"{r['mode']}, per rank (ms per profiled step, share of the step):",
                    format_ranks([x["profile"] for x in r["ranks"]])]
    return "\n".join(out)


def main(argv=None):
    from parallel.runtime import init_distributed, launch_env
    args = parse_args(argv)
    launch = launch_env()
    if launch is None:
        raise SystemExit("bench_scaling runs under a launcher with 2 processes: torchrun --nproc_per_node 2 ...")
    own_group = not dist.is_initialized()
    device = init_distributed(launch, torch.device(args.device))  # NCCL on the LOCAL_RANK GPU, or gloo
    torch.backends.cuda.matmul.allow_tf32 = True
    _, cfg = row_config(args, "one")
    args.rows = args.rows or cfg.data.batch_size
    batch = {k: v.to(device) for k, v in make_batch(cfg.model, args.rows, cfg.data.seq_len, cfg.data.max_images,
                                                     seed=0).items()}
    noise = make_noise(cfg.model, batch).to(device)
    rows = []
    for mode in args.modes.split(","):
        try:
            rows.append(run_row(args, mode, device, batch, noise))
        except Exception as e:  # noqa: BLE001  (e.g. a compile failure: report it, go on with the next row)
            print(f"rank {dist.get_rank()}: {mode} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            gc.collect()
            dist.barrier()
            continue
        if dist.get_rank() == 0:  # as it goes: a run stopped by a time limit still reports what it did
            r = rows[-1]
            print(f"{mode}: step {r['step_s'] * 1e3:.1f} ms, loss {r['loss']:.4f}, peak {r['peak_GiB']:.1f} GiB",
                  flush=True)
            if r["ranks"][0]["profile"]:
                print(format_ranks([x["profile"] for x in r["ranks"]]), flush=True)
    efficiencies(rows)
    if dist.get_rank() == 0:
        print(f"\n{args.rows} rows x {cfg.data.seq_len} tokens, {device.type}, world {dist.get_world_size()}\n")
        print(report(rows), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=rows, args=vars(args)), indent=1))
    if own_group:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
