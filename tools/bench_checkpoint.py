"""Checkpoint benchmark: sharded saves and loads (parallel/checkpoint.py, torch.distributed.checkpoint)
against the gather path of before (one model.pt gathered onto rank 0), measured in the same run.

    torchrun --nproc_per_node 2 tools/bench_checkpoint.py --config configs/h200_1b.yaml              # DP2, ZeRO-1
    torchrun --nproc_per_node 2 tools/bench_checkpoint.py --config configs/h200_1b.yaml --set parallel.tp=2 \\
        --set parallel.zero_stage=0
    torchrun --nproc_per_node 2 tools/bench_checkpoint.py --device cpu --config configs/tiny.yaml    # gloo smoke run

The model is built at the config's layout (--set overrides; default here parallel.zero_stage=1) on
synthetic weights (its init), the optimizer state is created (an lr-0 step on zero gradients, or
DeepSpeed's partitions), then each row runs on every rank, between barriers:
  gather save      the old path: the whole model gathered over DP (ZeRO masters), TP and PP onto
                   rank 0 (parallel.checkpoint.full_model_state) and torch.save'd as model.pt, plus
                   the old optimizer files (ZeRO: zero/ per rank; else per TP x PP coordinate)
  gather load      the old resume: every rank torch.loads the whole model.pt and slices its TP shards
                   (ZeRO: masters and moments from zero/; else its coordinate's AdamW file)
  sharded save     every rank writes its own pieces (state/, DCP), synchronously
  sharded load     every rank reads its own pieces back (into the live engine)
  async save       AsyncSave.start (what the training step waits for: the copy to CPU), then finish
                   (the background write and the commit): both times are reported
Per row and rank: seconds (the slowest rank's wall time between barriers), peak host memory over
the row's start (RSS sampled every 5 ms) and peak GPU memory over the row's start
(torch.cuda.max_memory_allocated). The sharded rows run first, on a process that holds only the
model and optimizer: RSS growth is a lower bound where an earlier row's freed memory is reused,
which favours the gather rows that come last. Checkpoints go to --dir (removed per row group).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.config import load_config  # noqa: E402
from megaflow.optim import set_lr  # noqa: E402
from parallel.topology import Topology  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak host RSS and GPU memory over the block, above what was held at its start."""

    def __init__(self, device):
        self.device, self.stop = device, threading.Event()

    def __enter__(self):
        self.host0 = self.host = rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.gpu0 = torch.cuda.memory_allocated(self.device)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.host = max(self.host, rss_bytes())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.host = max(self.host, rss_bytes())
        self.host_gb = (self.host - self.host0) / 2**30
        self.gpu_gb = 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_gb = (torch.cuda.max_memory_allocated(self.device) - self.gpu0) / 2**30


def prime_optimizer(engine) -> None:
    """Optimizer state as after a step, without data: ZeRO's partitions, or an lr-0 AdamW step on
    zero gradients (which changes no weight)."""
    if hasattr(engine, "ds_config"):
        from parallel.zero_checkpoint import ensure_optimizer_state
        ensure_optimizer_state(engine)
        return
    for p in engine.params:
        p.grad = torch.zeros_like(p)
    set_lr(engine.optimizer, 0.0)
    engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)


def primed_engine(config: str, overrides: list, device_name: str) -> tuple:
    """(device, cfg, topology, dtype, model, stages, engine) of this rank, under torchrun: the
    engine at the config's layout on its init weights, with optimizer state (prime_optimizer)."""
    from parallel.runtime import build_engine, build_stages, init_distributed, launch_env
    launch = launch_env()
    if launch is None:
        raise SystemExit("launch with torchrun --nproc_per_node N (N >= 2)")
    device = init_distributed(launch, torch.device(device_name))
    cfg = load_config(config, [f"train.device={device_name}", *overrides])
    p = cfg.parallel
    topo = Topology(tp=p.tp, pp=p.pp, flow_tp=p.flow_tp)
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and device.type == "cuda" else None
    model, stages, tied = build_stages(cfg.model, p, topo, device, cfg.train.seed, None, cfg.data.seq_len)
    engine = build_engine(cfg, model, stages, tied, topo, dtype)
    prime_optimizer(engine)
    return device, cfg, topo, dtype, model, stages, engine


def gather_save(engine, model, topo, d: Path) -> None:
    from parallel.checkpoint import full_model_state
    state = full_model_state(model, engine, topo)
    if topo.rank == 0:
        torch.save(state, d / "model.pt")
    del state
    if hasattr(engine, "ds_config"):
        engine.save(d)
    elif topo.dp_rank == 0:
        torch.save(engine.state_dict(), d / f"optim.pp{topo.pp_rank:02d}_tp{topo.tp_rank:02d}.pt")


def gather_load(engine, topo, d: Path) -> None:
    from parallel.checkpoint_tp import load_full_state_dict
    full = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    if hasattr(engine, "ds_config"):
        if engine.stage < 3:
            for m in ([st.module for st in engine.stages] if engine.stages else [engine.module.model]):
                load_full_state_dict(m, full, strict=False)
        engine.load(d)
    else:
        for st in engine.stages:
            load_full_state_dict(st.module, full, strict=False)
        engine.load_state_dict(torch.load(d / f"optim.pp{topo.pp_rank:02d}_tp{topo.tp_rank:02d}.pt",
                                          map_location="cpu", weights_only=False))
    del full


def row(name: str, fn, topo, device, results: list) -> None:
    dist.barrier()
    with Peak(device) as peak:
        t0 = time.perf_counter()
        extra = fn() or {}
        dist.barrier()
        seconds = time.perf_counter() - t0
    mine = {"rank": topo.rank, "host_gb": round(peak.host_gb, 3), "gpu_gb": round(peak.gpu_gb, 3), **extra}
    ranks = [None] * topo.world_size
    dist.all_gather_object(ranks, mine)
    results.append({"row": name, "seconds": round(seconds, 3), "ranks": ranks})
    if topo.rank == 0:
        per = "; ".join(f"r{r['rank']} host +{r['host_gb']:.2f} GB gpu +{r['gpu_gb']:.2f} GB"
                        + "".join(f" {k} {v}" for k, v in r.items() if k not in ("rank", "host_gb", "gpu_gb"))
                        for r in ranks)
        print(f"{name:<16} {seconds:8.2f} s   {per}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/h200_1b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dir", default="/tmp/megaflow_bench_checkpoint")
    ap.add_argument("--rows", default="gather,sharded,async", help="which rows: gather, sharded, async")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from parallel.checkpoint import AsyncSave, load_engine_state, save_engine_state
    device, cfg, topo, dtype, model, stages, engine = primed_engine(args.config, ["parallel.zero_stage=1",
                                                                                  *args.overrides], args.device)
    p = cfg.parallel
    with torch.device("meta"):
        from megaflow.model.starflow import STARFlow2
        n_params = sum(x.numel() for x in STARFlow2(cfg.model).parameters())  # the whole model
    if topo.rank == 0:
        print(f"{topo.world_size} ranks, tp {topo.tp} pp {topo.pp} dp {topo.dp} zero {p.zero_stage}, "
              f"{n_params / 1e9:.3f} B parameters, dtype {dtype or 'fp32'}, device {device.type}", flush=True)
    root = Path(args.dir)
    d = root / "ckpt"

    def fresh():
        if topo.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
            d.mkdir(parents=True)
        dist.barrier()

    def size_gb():
        return {"gb_on_disk": round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**30, 3)}

    results, which = [], set(args.rows.split(","))
    if "sharded" in which:
        fresh()
        row("sharded save", lambda: (save_engine_state(engine, d, topo), dist.barrier(), size_gb())[-1],
            topo, device, results)
        row("sharded load", lambda: {"step": load_engine_state(engine, d, topo)}, topo, device, results)
    if "async" in which:
        fresh()
        saver = AsyncSave(topo)
        box = {}

        def start():
            t0 = time.perf_counter()
            saver.start(root / "async", 1, engine, lambda _d: None, 1)
            box["blocking_s"] = round(time.perf_counter() - t0, 3)
            return {"blocking_s": box["blocking_s"]}
        row("async start", start, topo, device, results)
        row("async finish", lambda: {"committed": saver.finish().name}, topo, device, results)
    if "gather" in which:
        fresh()
        row("gather save", lambda: (gather_save(engine, model, topo, d), dist.barrier(), size_gb())[-1],
            topo, device, results)
        row("gather load", lambda: gather_load(engine, topo, d), topo, device, results)
    if topo.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"layout": {"tp": topo.tp, "pp": topo.pp, "dp": topo.dp,
                                                              "zero_stage": p.zero_stage},
                                                   "params": n_params, "rows": results}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
