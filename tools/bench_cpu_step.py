"""CPU seconds per training step, variants of one config alternated: a speed comparison that holds
on a shared machine, where wall time does not (docs/benchmarks.md, "TarFlow-only Fashion-MNIST on
the CPU, 2x").

    python tools/bench_cpu_step.py --config configs/tarflow_fmnist28.yaml --threads 1 --rounds 6 \
        --variant fp32="train.dtype=fp32;train.param_dtype=fp32;train.compile=off" --variant new=

Each variant is built as tools/profile_step.py builds it (`--real-data`: a batch of data.local) with
its PlainEngine, and takes 2 warm-up steps (compilation); then `--rounds` rounds run one step of
every variant in turn, each timed with the process's CPU time (`time.process_time`: all its
threads, so with one thread it does not count the time other processes take the core). Printed:
the median and every step's CPU seconds per variant, and each median over the first variant's.
What it does not do: time data loading or the loop (megaflow train's log does), or wall time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.config import load_config  # noqa: E402
from tools.profile_step import build, parse_variant  # noqa: E402


def make_step(config: str, overrides: list):
    """A function that runs one training step of the config on one fixed real batch."""
    from megaflow.train import PlainEngine, pick_dtype
    cfg = load_config(config, overrides)
    device = torch.device("cpu")
    model, source = build(cfg, device, True)
    engine = PlainEngine(model, cfg, pick_dtype(cfg.train.dtype, device))
    batch, mcfg, g = next(source), model.cfg, torch.Generator().manual_seed(1)
    B, M = batch["image_valid"].shape

    def step() -> float:
        noise = torch.rand(B, M, mcfg.fae.n_tokens, mcfg.fae.latent_dim, generator=g)  # (B, M, N, D)
        return float(engine.train_step(batch, noise, torch.ones(B), cfg.train.lr)["loss"])

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config (YAML)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V;K=V",
                    help="a variant of the config ('NAME=' for the config as it is); repeatable")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=6, help="timed steps of each variant")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant or ["config="]]
    steps = {}
    for name, overrides in variants:
        steps[name] = make_step(args.config, overrides)
        for _ in range(2):
            steps[name]()
    times: dict = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.process_time()
            step()
            times[name].append(time.process_time() - t0)
    base = statistics.median(times[variants[0][0]])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:12s} CPU s/step {med:.3f} ({base / med:.2f}x the first)  steps: "
              + " ".join(f"{t:.2f}" for t in ts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
