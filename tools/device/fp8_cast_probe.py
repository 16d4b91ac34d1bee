"""How fast can the FP8 path write its transposed copies? (issue 19's next lever; prepared, not yet run on a GPU)

In the ~3B FP8 step (docs/benchmarks.md "FP8 on torch._scaled_mm, round 2") ~37 ms of the ~56 ms of
FP8 overhead are inductor kernels that cast to e4m3 and also write the transposed copy the backward's
GEMMs need (Hopper's FP8 GEMMs read both operands K-major, so dW = dy^T x needs dy and x token-major);
the largest runs at about a tenth of the memory bandwidth. This probe times, on one (M, K) bf16
activation, the ways of producing both layouts, each as GB moved per second against a plain bf16 copy
(the bandwidth yardstick), so the next round can pick its lever before building it:

    copy        y = x.clone()                                               (bf16 read + write)
    cast        q = e4m3(x * s)                                             compiled
    cast+t      q, q^T from x in one compiled graph                         (what megaflow/fp8.py's step does)
    cast+t nd   the same with inductor's prefer_nd_tiling
    norm+cast+t RMSNorm(x) * w, then q and q^T                              (the slowest kernel of the step)
    t of q      q^T = q.t().contiguous() alone, compiled (a pure one-byte transpose: what the step
                would run if the cast and the transposed store were not fused)
    eager t     the same in eager ATen

    python3 tools/device/fp8_cast_probe.py [--rows 16384] [--cols 4096 11008]        # a GPU
    python3 tools/device/fp8_cast_probe.py --rows 64 --cols 32 --device cpu --reps 2  # logic check only

The amax reduction is left out (the scale is given): this measures the stores alone.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
FMAX = torch.finfo(E4M3).max


def cast(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x.float() * s).clamp(-FMAX, FMAX).to(E4M3)


def cast_t(x: torch.Tensor, s: torch.Tensor) -> tuple:
    q = cast(x, s)
    return q, q.t().contiguous()


def norm_cast_t(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> tuple:
    return cast_t(F.rms_norm(x.float(), (x.shape[-1],), w.float()), s)


def timed(fn, args, device, reps: int) -> float:
    """Median seconds of fn(*args) over `reps` calls after two warm-up calls."""
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compiled(fn, nd: bool = False):
    import torch._inductor.config as cfg
    with cfg.patch({"triton.prefer_nd_tiling": nd}):
        return torch.compile(fn, dynamic=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16384, help="M: tokens (16 x 1024 in the measured step)")
    ap.add_argument("--cols", type=int, nargs="+", default=[4096, 11008], help="K: the VLM width, its MLP width")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"{'K':>6s} {'variant':12s} {'ms':>8s} {'GB/s':>8s}  "
          f"(M = {args.rows}; bytes: what the variant must read and write)")
    for k in args.cols:
        x = torch.randn(args.rows, k, device=device, dtype=torch.bfloat16)
        w = torch.ones(k, device=device, dtype=torch.bfloat16)
        s = torch.tensor(FMAX / 8.0, device=device)
        n = x.numel()
        q = cast(x, s)
        rows = [("copy", lambda a: a.clone(), (x,), 4 * n),
                ("cast", compiled(cast), (x, s), 3 * n),
                ("cast+t", compiled(cast_t), (x, s), 4 * n),
                ("norm+cast+t", compiled(norm_cast_t), (x, w, s), 4 * n)]
        if device.type == "cuda":  # inductor's Triton tiling flag: GPU code only
            rows.insert(3, ("cast+t nd", compiled(cast_t, nd=True), (x, s), 4 * n))
        rows.append(("t of q", compiled(lambda a: a.t().contiguous()), (q,), 2 * n))
        rows.append(("eager t", lambda a: a.t().contiguous(), (q,), 2 * n))
        for name, fn, fargs, nbytes in rows:
            try:
                sec = timed(fn, fargs, device, args.reps)
                print(f"{k:6d} {name:12s} {sec * 1e3:8.3f} {nbytes / sec / 1e9:8.0f}", flush=True)
            except Exception as e:  # one variant failing still reports the rest
                print(f"{k:6d} {name:12s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        q_ref, qt = cast_t(x, s)  # the layouts themselves: q^T is q transposed, bit for bit
        assert torch.equal(qt.view(torch.uint8), q_ref.view(torch.uint8).t())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
