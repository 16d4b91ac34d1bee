"""The distributed optimizer's AdamW on one GPU (issue 17, parallel.dp_shard_optimizer): what a DP2 rank's step saves.

Builds the model of --config (h200_1b: 0.9B trainable parameters) with megaflow/optim.py MainWeights (bf16 weights,
fp32 main weights in flat buffers, the flat one-pass AdamW), cuts the flat buffer into the data-parallel buckets
ParallelEngine makes (parallel/data_parallel.py: reverse model order, parallel.bucket_mb each) and times, as CUDA
graphs of the optimizer step alone (replays, CUDA events):
  whole     the flat AdamW over every weight: the one GPU's step, and the all-reduce DP2 path's on each rank
  rank R    over DP rank R's chunks only (`MainWeights.ranges`, as parallel/dist_optimizer.py sets them), one
            launch a bucket, the step's coefficients made once
and checks the ranges against the whole step: after one step from the same state, every owned element of the
fp32 main weights, both moments and the bf16 weights equals the whole step's bitwise, and nothing else moved.
No communication (one GPU): the reduce-scatter and all-gather are not here.

    python3 tools/device/dp_shard_adamw.py --config configs/h200_1b.yaml
    python tools/device/dp_shard_adamw.py --config configs/tiny.yaml --device cpu     # a CPU smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megaflow.config import load_config  # noqa: E402
from megaflow.model.starflow import build_model  # noqa: E402
from megaflow.optim import MainWeights, param_groups  # noqa: E402
from parallel.data_parallel import _fill  # noqa: E402


def weights_of(cfg, device) -> MainWeights:
    model = build_model(cfg.model, device, seed=0)
    w = MainWeights(model, param_groups(model, cfg.train.weight_decay), cfg.train, torch.bfloat16, flat_grads=False,
                    fused=device.type == "cuda")
    w.flat_step = True
    torch.manual_seed(1)
    w.flat_main_grad.normal_(0, 1e-3)
    for g in w.optimizer.param_groups:
        g["lr"], g["capturable"] = 1e-4, True
    return w


def shard_ranges(w: MainWeights, bucket_mb: float, dp: int, rank: int) -> list:
    """DP rank `rank`'s chunks of the buckets ParallelEngine would make (no remainders: asserted)."""
    base = w.flat_main.storage_offset()
    mains = [w.main[id(p)] for p in w.model_params]  # fp32, model order: what GradBuckets cuts
    out = []
    for group in _fill(mains[::-1], int(bucket_mb * 2 ** 20)):
        s = min(m.storage_offset() - base for m in group)
        n = sum(p.numel() for p in group)
        assert n % dp == 0, n
        c = n // dp
        out.append((s + rank * c, s + (rank + 1) * c, None))
    return out


def timed(w: MainWeights, ranges, device, reps: int) -> float:
    """Median ms of the optimizer step (the flat AdamW over `ranges`) as a replayed CUDA graph (CPU: eager)."""
    w.ranges = ranges
    if device.type != "cuda":
        t0 = time.perf_counter()
        w.step()
        return (time.perf_counter() - t0) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w.step()  # builds the flat moments and the kernel
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.step()
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[3:])


def check(cfg, device, bucket_mb: float) -> tuple:
    """One step over rank 0's ranges against one whole step from the same state (see the file docstring)."""
    whole, part = weights_of(cfg, device), weights_of(cfg, device)
    ranges = shard_ranges(part, bucket_mb, 2, 0)
    before = part.flat_main.clone()
    whole.step()
    part.ranges = ranges
    part.step()
    owned = torch.zeros(part.flat_main.numel(), dtype=torch.bool, device=device)
    for a, b, _ in ranges:
        owned[a:b] = True
    m_whole, m_part = whole._flat[0], part._flat[0]  # (2, n): exp_avg, exp_avg_sq
    pairs = [(whole.flat_main, part.flat_main), (m_whole[0], m_part[0]), (m_whole[1], m_part[1]),
             (whole.flat_param, part.flat_param)]
    same = all(torch.equal(x[owned], y[owned]) for x, y in pairs)
    still = torch.equal(part.flat_main[~owned], before[~owned]) and not m_part[:, ~owned].any()
    del part
    return (f"CHECK ranges vs whole step: owned elements {int(owned.sum()):,} of {owned.numel():,}, bitwise equal "
            f"(main, moments, bf16) {same}; the rest untouched {still}"), whole


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/h200_1b.yaml")
    p.add_argument("--device", default="cuda")
    p.add_argument("--bucket-mb", type=float, default=None, help="default: the config's parallel.bucket_mb")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    cfg = load_config(args.config, [])
    device = torch.device(args.device)
    bucket_mb = args.bucket_mb or cfg.parallel.bucket_mb
    t0 = time.perf_counter()
    line, w = check(cfg, device, bucket_mb)  # then times the optimizer of the whole step's weights
    print(f"{line} ({time.perf_counter() - t0:.0f} s)", flush=True)
    n = w.flat_main.numel()
    rows = [("whole (one GPU; each rank of DP2 all-reduce)", None)] + \
           [(f"DP2 sharded, rank {r}", shard_ranges(w, bucket_mb, 2, r)) for r in (0, 1)]
    for name, ranges in rows:
        ms = timed(w, ranges, device, args.reps)
        k = sum(b - a for a, b, _ in ranges) if ranges else n
        print(f"ROW {name}: {ms:.2f} ms for {k:,} of {n:,} weights, {len(ranges or [0])} launches", flush=True)


if __name__ == "__main__":
    main()
