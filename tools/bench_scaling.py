"""Scaling over N processes (issues 17, 20): one GPU vs DP, TP, TP+SP, PP and their products on one
config, with a per-rank breakdown of each layout's step (compute, exposed communication, pipeline
wait, idle), and a resume of a sharded checkpoint from one layout into another.

    torchrun --nproc_per_node 2 tools/bench_scaling.py --config configs/h200_1b.yaml --json $OUT/s.json
    torchrun --nproc_per_node 2 tools/bench_scaling.py --tiny --device cpu                  # gloo smoke
    torchrun --nproc_per_node 4 tools/bench_scaling.py --set parallel.zero_stage=1 \
        --modes one,dp4,dp2tp2,one_mb@parallel.zero_stage=0,dp2pp2,dp2pp2i,tp2pp2 --resume dp2tp2:dp2pp2

Every layout is built as `megaflow train` builds it (parallel/runtime.py: meta -> TP -> PP split ->
init -> engine; the one-GPU rows: megaflow.train.PlainEngine in each process on its own) and runs
full training steps (forward, backward, gradient reduction, clip, AdamW) on the same synthetic
batch of --rows rows: each data-parallel replica gets --rows rows (weak scaling over DP), the ranks
of one replica's TP and PP groups share them (strong scaling; PP splits them into --micro-batches).
Rows (--modes, comma-separated; `name@a.b=v;c.d=w` adds config overrides, e.g. tp2@train.compile=on):

    one      one GPU, one backward per step (PlainEngine): the baseline of layouts without PP
    one_mb   one GPU, --micro-batches accumulated (ParallelEngine, no peers): the baseline with PP;
             one_mb@parallel.micro_batches=1 is the ParallelEngine's own cost against `one`'s
    config   the config's own parallel section, as is (what `torchrun ... megaflow profile` runs)
    [dpD][tpT[sp]][ppP[i]]   a layout of the world: dp2, tp2, tp2sp (sequence parallel), pp2 (1F1B),
             pp2i (interleaved, 2 chunks a rank; pp2i4: 4), dp2tp2, dp2pp2i, tp2pp2, dp4, dp2tp2pp2, ...; D, if
             given, must be what the world leaves (world / (T x P))
Efficiency = tokens/s per GPU / the baseline's = baseline step / (T x P x step): weak scaling over
DP, strong over TP and PP. PP rows are measured against `one` (--pp-baseline: the plain one-GPU step
on the same rows, graphed under train.step_graph=auto; `one_mb` if the run has no `one` row), and
1 - efficiency is set beside the theory (P-1) / (v m + P-1) (m micro-batches, v chunks a rank); the
per-rank profile gives each rank's own bubble (p2p wait). --resume SRC:DST (two layout rows): SRC trains 2 steps, saves a
sharded checkpoint (parallel/checkpoint.py), takes a third step; DST loads it and takes that step:
the two losses must agree (to bf16 rounding).

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
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_args import bench_args  # noqa: E402
from tools.bench_turns import Turns  # noqa: E402
from parallel.rank_profile import clock, format_kernels, format_ranks, gather_ranks, profile_steps, sync_points  # noqa: E402
from parallel.topology import ParallelConfig, Topology  # noqa: E402
from tests.helpers import make_batch, make_noise  # noqa: E402  (the synthetic interleaved batch)

LAYOUT = re.compile(r"(?:dp(\d+))?(?:tp(\d+)(sp)?)?(?:pp(\d+)(i(\d*))?)?")  # pp2i4: 4 chunks a rank


def layout(name: str, world: int) -> Optional[dict]:
    """ParallelConfig fields of a layout row name ({} for one / one_mb, None for config)."""
    if name in ("one", "one_mb"):
        return {}
    if name == "config":
        return None
    m = LAYOUT.fullmatch(name)
    if not name or m is None:
        raise SystemExit(f"--modes: unknown row {name!r}; use one, one_mb, config or a layout such as "
                         f"dp2, tp2sp, pp2i, dp2tp2, tp2pp2")
    dp, tp, sp, pp, inter, chunks = m.groups()
    tp, pp = int(tp or 1), int(pp or 1)
    if world % (tp * pp) or (dp and int(dp) != world // (tp * pp)):
        raise SystemExit(f"--modes: row {name!r} needs {int(dp or 1) * tp * pp} processes; this run has {world}")
    out = dict(tp=tp, pp=pp, sequence_parallel=bool(sp))
    if inter:
        out.update(schedule="interleaved", virtual_stages=int(chunks or 2))
    return out


def parse_args(argv=None):
    p = bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    p.add_argument("--modes", default="one,dp2,tp2,tp2sp,one_mb,pp2", help="rows, comma-separated (see above)")
    p.add_argument("--rows", type=int, default=0, help="rows per step (per rank under DP; 0: data.batch_size)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches of one_mb and pp2")
    p.add_argument("--pp-baseline", default="one", choices=("one", "one_mb"), help="what PP rows are measured "
                   "against: one (the plain one-GPU step on the same rows; one_mb when the run has no one row) or one_mb")
    p.add_argument("--steps", type=int, default=6, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--profile", type=int, default=2, help="profiled steps per row (0: no breakdown)")
    p.add_argument("--profile-rows", default="", help="profile only these rows (comma-separated names, e.g. tp2 or tp2@parallel.async_tp=true; '' = all)")
    p.add_argument("--trace", default="", help="write DIR/<row>.rank<r>.json Chrome traces")
    p.add_argument("--top", type=int, default=0, help="print every rank's N costliest kernels and host "
                   "operators of each profiled row, where its host waits and copies come from, and the Python "
                   "call sites where one more step synchronised with the GPU")
    p.add_argument("--comm-probe", action="store_true", help="first time all-reduce / all-gather / "
                   "reduce-scatter of one TP activation (rows x seq_len x vlm.dim, bf16): bytes per second")
    p.add_argument("--json", default="", help="also write the results here (rank 0)")
    p.add_argument("--stacks-after", type=float, default=0, help="every rank writes its Python stacks to stderr "
                   "after this many seconds (faulthandler; 0: never): where a row stuck at a time limit was")
    p.add_argument("--turns", default="", help="DIR shared by bench processes started side by side: each compiles "
                   "its rows' first step at once, then they take turns for the rest (tools/bench_turns.py)")
    p.add_argument("--turns-n", type=int, default=1, help="how many processes share --turns")
    p.add_argument("--turns-wait", type=float, default=120.0, help="longest wait (s) for the others to be ready")
    p.add_argument("--turns-order", type=int, default=-1, help="this process's place in the turns (0 first; -1 any)")
    p.add_argument("--resume", default="", help="SRC:DST layout rows: resume SRC's sharded checkpoint at DST")
    p.add_argument("--resume-dir", default="/tmp/bench_scaling_ckpt", help="where --resume saves")
    return p.parse_args(argv)


def row_config(args, mode: str):
    """(name, Config) of one row: the base config, --set, the layout and the row's own overrides."""
    from megaflow.config import Config, load_config
    name, _, extra = mode.partition("@")
    fields = layout(name, dist.get_world_size() if dist.is_initialized() else 1)
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
    if fields is None:
        return name, cfg
    m = args.micro_batches if name == "one_mb" or fields.get("pp", 1) > 1 else 1
    if any(s.startswith("parallel.micro_batches=") for s in extra.split(";")):  # the row's own count wins
        m = cfg.parallel.micro_batches
    par = dataclasses.replace(cfg.parallel, micro_batches=m, **fields)
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


def count_fusions() -> dict:
    """{fused op: how many} that inductor's micro-pipeline TP pass (parallel.async_tp on NCCL) put into the
    graphs compiled from now on; the counts fill in as graphs compile."""
    import torch._inductor.fx_passes.post_grad as post_grad
    fused = {}
    original = getattr(post_grad.micro_pipeline_tp_pass, "original", post_grad.micro_pipeline_tp_pass)

    def counted(graph):
        original(graph)
        for node in graph.nodes:
            if "symm_mem" in str(node.target) and "fused" in str(node.target):
                fused[str(node.target)] = fused.get(str(node.target), 0) + 1
    counted.original = original
    post_grad.micro_pipeline_tp_pass = counted
    return fused


def run_row(args, mode: str, device, batch: dict, noise, turns) -> dict:
    name, cfg = row_config(args, mode)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and device.type == "cuda" else None
    # each row starts with empty compile caches: rows of other shapes (TP's fewer heads per rank, PP's
    # 1-row micro-batches) would otherwise exhaust the recompile limit of the compiled FlexAttention
    # (megaflow/model/masks.py, dynamic=False), which then runs eagerly and several times slower
    torch._dynamo.reset()
    gc.collect()  # after the reset, whose compiled code held the previous row's model (its peak counted here)
    import torch._inductor.config as inductor_config
    inductor_config._micro_pipeline_tp = False  # a row with parallel.async_tp turns it on (apply_tp)
    try:  # and one with parallel.tp_all_reduce=symm routes its TP group's all-reduces (trees before it: no such switch)
        from parallel.comm import use_symm_all_reduce
        use_symm_all_reduce(dist.group.WORLD, False)
    except ImportError:
        pass
    fused = count_fusions()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_row = clock(device)
    engine, topo = build(name, cfg, device, dtype)
    progress(f"{mode}: built in {clock(device) - t_row:.1f} s")
    times, loss0 = [], None
    step = lambda: engine.train_step(batch, noise, None, 1e-5)  # noqa: E731
    for i in range(args.warmup + args.steps):
        if i == (min(1, args.warmup) if turns.turn == 0 else 0):  # --turns: the GPUs are this process's from here
            turns.start()  # (a first row compiles before, side by side with the other processes; a later one inside)
        t0 = clock(device)
        out = step()
        loss0 = float(out["loss"]) if loss0 is None else loss0
        if i >= args.warmup:
            times.append(clock(device) - t0)
        if i == 0:  # compilation happens here: a row cut by a time limit says how far it got
            progress(f"{mode}: first step (compiles) {clock(device) - t0:.1f} s")
    progress(f"{mode}: {args.warmup + args.steps} steps done at {clock(device) - t_row:.1f} s")
    prof = None
    if args.profile and (not args.profile_rows or {name, mode} & set(args.profile_rows.split(","))):
        trace = f"{args.trace}/{mode.replace('@', '_').replace(';', '_')}.rank{dist.get_rank()}.json" if args.trace else None
        prof = profile_steps(step, args.profile, device, trace, args.top)
        if args.top:
            prof["sync_points"] = sync_points(step, device)
    turns.end()
    row = dict(mode=mode, step_s=statistics.median(times), loss=float(out["loss"]), loss0=loss0, fused=fused,
               peak_GiB=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0,
               # a graphed step's activations live in the graph's private pool: compare reserved memory too
               reserved_GiB=torch.cuda.max_memory_reserved(device) / 2 ** 30 if device.type == "cuda" else 0.0,
               graphed=getattr(getattr(engine, "graph", None), "graph", None) is not None)  # train.step_graph
    del engine, out
    ranks = gather_ranks(dict(row, profile=prof))
    dist.barrier()
    p = cfg.parallel
    return dict(row, step_s=max(r["step_s"] for r in ranks), ranks=ranks, name=name,
                tokens=args.rows * cfg.data.seq_len, m=p.micro_batches, tp=p.tp, pp=p.pp,
                v=p.virtual_stages if p.schedule == "interleaved" else 1,
                gpus=1 if name in ("one", "one_mb") else dist.get_world_size())


def progress(line: str) -> None:
    """A timestamped line from rank 0 (time limits cut rows on lent machines: say how far a row got)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def probe_collectives(cfg, rows: int, device, repeats: int = 10) -> None:
    """Time the collectives of tensor parallelism on one activation of the run's shape (rank 0
    prints ms and GB/s of the tensor's size): the floor of what a TP step's communication costs."""
    from parallel.comm import all_gather, all_reduce, reduce_scatter
    world = dist.group.WORLD
    dim = cfg.model.vlm.dim if cfg.model.vlm is not None else cfg.model.flow.dim
    x = torch.randn(rows, cfg.data.seq_len, dim, device=device, dtype=torch.bfloat16)  # (B, T, D)
    half = x.chunk(dist.get_world_size(), dim=1)[0].contiguous()  # (B, T / n, D)
    for name, fn in (("all_reduce", lambda: all_reduce(x, world)), ("all_gather T", lambda: all_gather(half, world, 1)),
                     ("reduce_scatter T", lambda: reduce_scatter(x, world, 1))):
        fn()
        t0 = clock(device)
        for _ in range(repeats):
            fn()
        ms = (clock(device) - t0) / repeats * 1e3
        if dist.get_rank() == 0:
            print(f"{name}: {tuple(x.shape)} bf16 ({x.numel() * 2 / 2 ** 20:.0f} MiB): {ms:.3f} ms, "
                  f"{x.numel() * 2 / ms / 1e6:.0f} GB/s of the full tensor", flush=True)


def efficiencies(rows: list, pp_baseline: str = "one") -> None:
    """Add 'efficiency' (and 'bubble' with PP) against the baselines measured in the same run. PP rows
    against `pp_baseline`: 'one' (the plain one-GPU step on the same rows, at its best: a graphed step
    under train.step_graph=auto; one_mb if the run has no one row) or 'one_mb' (the same micro-batches
    accumulated on one GPU, whose host work per micro-batch can dwarf its GPU work: issue 17)."""
    for r in rows:
        ref = (pp_baseline if any(b["name"] == pp_baseline for b in rows) else "one_mb") if r["pp"] > 1 else "one"
        # the baseline row of the same micro-batch count (PP), the plain one before one with overrides
        same = [b for b in rows if b["name"] == ref and (ref == "one" or b["m"] == r["m"])]
        base = ([b for b in same if b.get("mode", ref) == ref] or same or [None])[0]
        if r["gpus"] == 1 or base is None:
            continue
        r["efficiency"] = base["step_s"] / (r["tp"] * r["pp"] * r["step_s"])  # tokens/s per GPU / the baseline's
        r["baseline"] = base.get("mode", ref)
        if r["pp"] > 1:
            p, m, v = r["pp"], r["m"], r["v"]
            r["bubble"], r["bubble_theory"] = 1 - r["efficiency"], (p - 1) / (v * m + p - 1)


def report(rows: list) -> str:
    out = ["| row | step ms | tokens/s per GPU | efficiency (against) | 1 - efficiency (PP: bubble theory) | "
           "peak GiB allocated / reserved (max over ranks) |", "|---|---|---|---|---|---|"]
    for r in rows:
        dp = r["gpus"] // (r["tp"] * r["pp"])
        per_gpu = r["tokens"] * dp / r["step_s"] / r["gpus"]
        eff = f"{r['efficiency']:.1%} ({r['baseline']})" if "efficiency" in r else "-"
        bub = f"{r['bubble']:.3f} ({r['bubble_theory']:.3f})" if "bubble" in r else "-"
        peak = max(x["peak_GiB"] for x in r["ranks"])
        reserved = max(x.get("reserved_GiB", 0.0) for x in r["ranks"])
        out.append(f"| {r['mode']} | {r['step_s'] * 1e3:.1f} | {per_gpu:.0f} | {eff} | {bub} | {peak:.1f} / {reserved:.1f} |")
    for r in rows:
        if r["ranks"][0]["profile"]:
            out += ["", f"{r['mode']}, per rank (ms per profiled step, share of the step):",
                    format_ranks([x["profile"] for x in r["ranks"]])]
    return "\n".join(out)


def resume_check(args, spec: str, device, batch: dict, noise) -> dict:
    """SRC:DST: SRC trains 2 steps, saves a sharded checkpoint and takes a third step; DST loads the
    checkpoint and takes the same third step. Returns both losses and the save / load seconds."""
    from parallel.checkpoint import load_engine_state, save_distributed, save_engine_state
    src, _, dst = spec.partition(":")
    out = {"resume": spec}
    for which, mode in (("src", src), ("dst", dst)):
        name, cfg = row_config(args, mode)
        if name in ("one", "one_mb"):
            raise SystemExit(f"--resume {spec!r}: both sides must be layout rows (dp2, tp2, ...), not {name!r}")
        dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and device.type == "cuda" else None
        gc.collect()
        torch._dynamo.reset()
        engine, topo = build(name, cfg, device, dtype)
        step = lambda: float(engine.train_step(batch, noise, None, 1e-5)["loss"])  # noqa: E731
        t0 = clock(device)
        if which == "src":
            step(), step()
            t0 = clock(device)
            out["path"] = str(save_distributed(args.resume_dir, 2, lambda d: save_engine_state(engine, d, topo),
                                               1, topo))
        else:
            out["load_step"] = load_engine_state(engine, Path(out["path"]), topo)
        out[f"{which}_s"] = clock(device) - t0
        out[f"{which}_loss"] = step()
        del engine
    out["rel_diff"] = abs(out["dst_loss"] - out["src_loss"]) / max(abs(out["src_loss"]), 1e-12)
    return out


def main(argv=None):
    from parallel.runtime import init_distributed, launch_env
    args = parse_args(argv)
    if args.stacks_after > 0:
        import faulthandler
        faulthandler.dump_traceback_later(args.stacks_after, exit=False)
    launch = launch_env()
    if launch is None and os.environ.get("WORLD_SIZE") == "1":  # torchrun --nproc_per_node 1: the one-GPU rows alone
        from parallel.runtime import LaunchEnv
        launch = LaunchEnv(0, 1, int(os.environ.get("LOCAL_RANK", 0)))
    if launch is None:
        raise SystemExit("bench_scaling runs under a launcher: torchrun --nproc_per_node N tools/bench_scaling.py ...")
    own_group = not dist.is_initialized()
    device = init_distributed(launch, torch.device(args.device))  # NCCL on the LOCAL_RANK GPU, or gloo
    torch.backends.cuda.matmul.allow_tf32 = True
    _, cfg = row_config(args, "one")
    args.rows = args.rows or cfg.data.batch_size
    batch = {k: v.to(device) for k, v in make_batch(cfg.model, args.rows, cfg.data.seq_len, cfg.data.max_images,
                                                     seed=0).items()}
    noise = make_noise(cfg.model, batch).to(device)
    if args.comm_probe:
        probe_collectives(cfg, args.rows, device)
    rows = []
    turns = Turns(args.turns, args.turns_n, args.turns_wait, args.turns_order)
    for mode in args.modes.split(","):
        try:
            rows.append(run_row(args, mode, device, batch, noise, turns))
        except Exception as e:  # noqa: BLE001  (e.g. a compile failure: report it, go on with the next row)
            print(f"rank {dist.get_rank()}: {mode} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            turns.give_up()
            gc.collect()
            dist.barrier()
            continue
        if dist.get_rank() == 0:  # as it goes: a run stopped by a time limit still reports what it did
            r = rows[-1]
            print(f"{mode}: step {r['step_s'] * 1e3:.1f} ms, first loss {r['loss0']:.4f}, loss {r['loss']:.4f}, "
                  f"peak {r['peak_GiB']:.1f} GiB (reserved {r['reserved_GiB']:.1f})"
                  + (", one CUDA graph a step" if r["graphed"] else "")
                  + (f", async TP fusions {r['fused']}" if r["fused"] else ""), flush=True)
            prof = r["ranks"][0]["profile"]
            if prof:
                print(format_ranks([x["profile"] for x in r["ranks"]]), flush=True)
                for rank, x in enumerate(r["ranks"]):
                    if "kernels" in x["profile"]:
                        print(f"{mode} rank {rank}: {format_kernels(x['profile']['kernels'])}", flush=True)
            for rank, x in enumerate(r["ranks"]):
                if x["profile"] and "top" in x["profile"]:
                    print(f"rank {rank}: {x['profile']['syncs']:.0f} synchronising calls or host<->device "
                          f"copies per step (device-to-device copies not counted)\n{x['profile']['top']}\nwhere they come from (per step):\n"
                          f"{x['profile']['sync_sources']}\nsynchronising Python call sites of one step "
                          f"(torch.cuda.set_sync_debug_mode):\n{x['profile'].get('sync_points', '')}", flush=True)
    efficiencies(rows, args.pp_baseline)
    resumed = resume_check(args, args.resume, device, batch, noise) if args.resume else None
    if dist.get_rank() == 0:
        print(f"\n{args.rows} rows x {cfg.data.seq_len} tokens, {device.type}, world {dist.get_world_size()}\n")
        print(report(rows), flush=True)
        if resumed:
            r = resumed
            print(f"\nresume {r['resume']}: saved at step 2 in {r['src_s']:.2f} s, loaded in {r['dst_s']:.2f} s; "
                  f"step 3 loss {r['src_loss']:.5f} (source layout) vs {r['dst_loss']:.5f} (resumed), "
                  f"relative difference {r['rel_diff']:.1e}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=rows, resume=resumed, args=vars(args)), indent=1))
    if own_group:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
