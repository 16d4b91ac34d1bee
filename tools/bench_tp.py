"""Tensor-parallel check and benchmark: TP=world vs TP=1 on the same weights, then step time and
peak memory of TP=1, TP=world and TP=world with sequence parallelism.

    torchrun --nproc_per_node 2 tools/bench_tp.py --check --config configs/bench_tp.yaml   # GPUs, NCCL
    torchrun --nproc_per_node 2 tools/bench_tp.py --check --tiny --device cpu              # CPU, gloo

--check: every rank builds the single-process model (same seed) and the TP model loaded from its
state dict, runs one fp32 step on a synthetic interleaved batch (tests/helpers.make_batch) and
compares loss and every gathered gradient (TF32 off); exit code 1 if beyond --tol.
Timing: full training steps (forward, backward, AdamW), median over --steps after --warmup, timed
with CUDA events (wall clock on CPU); peak memory is torch.cuda.max_memory_allocated. The TP=1 row
runs the whole model on every rank at once (no communication); rank 0's numbers are printed.
Not a training loop: no data loading, no data parallelism, no pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_args import bench_args  # noqa: E402
from megaflow.model.starflow import build_model  # noqa: E402
from parallel.backend import fp8_forward  # noqa: E402
from parallel.checkpoint_tp import gather_full_grads  # noqa: E402
from parallel.tensor_parallel import build_tp_model  # noqa: E402
from parallel.topology import ParallelConfig, Topology  # noqa: E402
from tests.helpers import make_batch, make_noise  # noqa: E402  (the synthetic interleaved batch)


def parse_args(argv=None):
    p = bench_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), config="configs/bench_tp.yaml",
                   sections="model and data")
    p.add_argument("--check", action="store_true", help="first check TP equals TP=1 (fp32)")
    p.add_argument("--tol", type=float, default=1e-5, help="tolerance of the check (loss and gradients, relative)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype of the timed steps (CUDA)")
    p.add_argument("--backend", default="local", choices=("local", "te"), help="parallel.backend")
    p.add_argument("--fp8", default="off", choices=("off", "delayed", "current"),
                   help="also time the TP rows with this parallel.fp8 (with --backend te; amax reduced over the TP group)")
    p.add_argument("--json", default="", help="also write the results here (rank 0)")
    return p.parse_args(argv)


def load(args):
    """(model config, batch size, sequence length, images per row)."""
    if args.tiny:
        from tests.helpers import tiny_config
        return replace(tiny_config(shallow_heads=4), stage="all"), 2, 48, 2
    from megaflow.config import load_config
    cfg = load_config(args.config, args.set)
    return cfg.model, cfg.data.batch_size, cfg.data.seq_len, cfg.data.max_images


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def perturb(model, seed: int = 1):
    """Make zero-initialised parts (skips, heads, adapter output) non-zero so the check sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.02 * torch.randn(p.shape, generator=g)).to(p.device))


def check(mcfg, batch, noise, topo, args, device) -> bool:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref = build_model(mcfg, device, seed=0)
    perturb(ref)
    loss_ref, _ = ref(batch, noise)
    loss_ref.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ok = True
    for sp in (False, True):
        pcfg = ParallelConfig(tp=topo.tp, sequence_parallel=sp, backend=args.backend)
        model = build_tp_model(mcfg, topo, pcfg, device, state_dict=ref.state_dict())
        loss, _ = model(batch, noise)
        loss.backward()
        grads = gather_full_grads(model)
        loss_err = abs(loss.item() - loss_ref.item()) / max(1.0, abs(loss_ref.item()))
        worst, grad_err = "", 0.0
        for n, g in ref_grads.items():
            e = float((grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-12))
            if e >= grad_err:
                worst, grad_err = n, e
        passed = loss_err < args.tol and grad_err < args.tol and set(grads) == set(ref_grads)
        ok &= passed
        if topo.rank == 0:
            print(f"check tp={topo.tp} sequence_parallel={sp}: loss {loss.item():.6f} vs {loss_ref.item():.6f} "
                  f"(rel err {loss_err:.2e}), max grad rel err {grad_err:.2e} ({worst}), "
                  f"{len(grads)} gradients: {'PASS' if passed else 'FAIL'}", flush=True)
        del model, grads
    del ref, ref_grads
    return ok


def time_steps(model, batch, noise, args, device, fp8: str = "off") -> tuple:
    """(median step seconds, peak memory bytes or 0 on CPU)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    times = []
    fp8 = fp8_forward(fp8, [model], dist.group.WORLD)  # a no-op context for 'off'
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=cuda and dtype != torch.float32), fp8(0):
            loss, _ = model(batch, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    del opt
    return statistics.median(times), peak


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "te":  # before any CUDA work (a cuDNN torch loads first can break TE's; docs/benchmarks.md)
        from parallel.backend import import_te
        import_te()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    topo = Topology(tp=world)
    mcfg, B, T, M = load(args)
    batch = to_device(make_batch(mcfg, batch_size=B, seq_len=T, max_images=M), device)
    noise = make_noise(mcfg, batch).to(device)
    n_params = sum(p.numel() for p in build_model(mcfg, "meta").parameters())
    if topo.rank == 0:
        print(f"model: {n_params / 1e6:.1f}M parameters, batch {B} x {T} tokens, world {world}, "
              f"device {device.type}, backend {args.backend}", flush=True)
    ok = check(mcfg, batch, noise, topo, args, device) if args.check else True

    rows = []
    layouts = [("TP=1", 1, False, "off"), (f"TP={world}", world, False, "off"), (f"TP={world}+SP", world, True, "off")]
    if args.fp8 != "off":
        layouts += [(f"TP={world} FP8", world, False, args.fp8), (f"TP={world}+SP FP8", world, True, args.fp8)]
    for name, tp, sp, fp8 in layouts:
        if tp == 1:
            model = build_model(mcfg, device, seed=0)
        else:
            model = build_tp_model(mcfg, topo, ParallelConfig(tp=tp, sequence_parallel=sp, backend=args.backend), device)
        local = sum(p.numel() for p in model.parameters())
        step, peak = time_steps(model, batch, noise, args, device, fp8)
        rows.append(dict(name=name, params_per_rank_M=local / 1e6, step_ms=step * 1e3,
                         tokens_per_s=B * T / step, peak_mem_GiB=peak / 2**30))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()
    if topo.rank == 0:
        print(f"\n{'config':<10} {'params/rank':>12} {'step ms':>9} {'tokens/s':>10} {'peak GiB':>9}")
        for r in rows:
            print(f"{r['name']:<10} {r['params_per_rank_M']:>11.1f}M {r['step_ms']:>9.1f} "
                  f"{r['tokens_per_s']:>10.0f} {r['peak_mem_GiB']:>9.2f}")
        print(f"(median of {args.steps} steps after {args.warmup} warm-up, {args.dtype} autocast on CUDA"
              + (f"; FP8 rows: {args.fp8} scaling in the TE layers)" if args.fp8 != "off" else ")"))
        if args.check:
            print("check passed" if ok else "check FAILED")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(rows=rows, check=ok, params_M=n_params / 1e6, batch=B,
                                                       seq_len=T, device=device.type, world=world), indent=1))
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
