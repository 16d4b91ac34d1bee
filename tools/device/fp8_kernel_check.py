"""Is megaflow/fp8_kernels.py's one-read cast + cast-transpose right, and how fast? (issue 19, GPU only)

1. Bytes: on fresh random bf16 tensors (several magnitudes, some values beyond the scale's range so the
   clamp saturates, odd shapes so the edge masks run) the Triton kernel's q and q^T, e4m3 and e5m2,
   equal bit for bit (as uint8) torch's eager `fp8_cast` and the same cast compiled by inductor (what the
   training step ran before). Any mismatch: exit 1, before any timing.
2. Speed, (M, K) bf16 activations of the ~3B step (16 x 1024 tokens): GB moved per second (bf16 read
   + both FP8 layouts written, 4 bytes an element) of the kernel at several tiles, against inductor's
   cast + transposed copy from one compiled graph and a plain bf16 copy (the bandwidth yardstick);
   medians of triton.testing.do_bench.

    python3 tools/device/fp8_kernel_check.py [--shapes 16384x4096 16384x22016]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megaflow.fp8_kernels import E4M3, E5M2, cast_t_triton, fp8_cast, fp8_cast_t  # noqa: E402

DEVICE = "cuda"  # --device cpu with TRITON_INTERPRET=1: a logic check of this script (the interpreter's own
# FP8 rounding differs from the GPU's at exponent carries, so its bytes do not all match there)
TILES = ((64, 128, 4), (128, 128, 8), (64, 64, 4), (128, 64, 4), (32, 128, 4), (64, 256, 8))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_bytes() -> bool:
    compiled = torch.compile(lambda t, s, d: (fp8_cast(t, s, d), fp8_cast(t, s, d).t().contiguous()), dynamic=False)
    ok = True
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per shape and format
    for m, k in ((16384, 4096), (4096, 11008), (1000, 1040), (16, 48)):
        for dtype in (E4M3, E5M2):
            for mag in (1e-3, 1.0, 300.0):
                t = (torch.randn(m, k, device=DEVICE) * mag).bfloat16()
                t.view(-1)[:: 997] *= 50  # beyond the scale below: saturates at the largest FP8 value
                scale = (torch.finfo(dtype).max / (t.float().abs().amax() / 20)).reshape(())
                q, qt = cast_t_triton(t, scale, dtype)
                q2, qt2 = fp8_cast_t(t, scale, dtype == E5M2)  # through the custom op
                ref = fp8_cast(t, scale, dtype)
                cq, cqt = compiled(t, scale, dtype)
                good = same(q, ref) and same(qt, ref.t().contiguous()) and same(q, cq) and same(qt, cqt) \
                    and same(q2, q) and same(qt2, qt)
                if not good:
                    ok = False
                    print(f"MISMATCH {m}x{k} {dtype} x{mag}: q==eager {same(q, ref)} q==compiled {same(q, cq)} "
                          f"qt==compiled {same(qt, cqt)}", flush=True)
        print(f"bytes {m}x{k}: {'equal' if ok else 'NOT equal'} (e4m3, e5m2; eager and compiled)", flush=True)
    return ok


def speed(shapes: list) -> None:
    from triton.testing import do_bench
    inductor = torch.compile(lambda t, s: (fp8_cast(t, s, E5M2), fp8_cast(t, s, E5M2).t().contiguous()),
                             dynamic=False)
    print(f"{'M x K':>12s} {'variant':28s} {'ms':>7s} {'GB/s':>7s}", flush=True)
    for m, k in shapes:
        ts = [torch.randn(m, k, device="cuda").bfloat16() for _ in range(3)]  # rotated: no L2 reuse across calls
        scale = torch.tensor(100.0, device="cuda")
        fp8_bytes, copy_bytes = 4 * m * k, 4 * m * k
        i = [0]

        def nxt():
            i[0] = (i[0] + 1) % 3
            return ts[i[0]]

        rows = [("bf16 copy", lambda: nxt().clone(), copy_bytes),
                ("inductor cast + t (e5m2)", lambda: inductor(nxt(), scale), fp8_bytes)]
        rows += [(f"triton {bm}x{bk} w{w}", (lambda tile: lambda: cast_t_triton(nxt(), scale, E5M2, tile))((bm, bk, w)),
                  fp8_bytes) for bm, bk, w in TILES]
        for name, fn, nbytes in rows:
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"{m:>6d}x{k:<6d} {name:28s} {ms:7.3f} {nbytes / ms / 1e6:7.0f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", nargs="+", default=["16384x4096", "16384x22016", "4096x11008"])
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    torch.manual_seed(0)
    if not check_bytes():
        print("fp8_kernel_check: the Triton kernel's bytes differ from torch's cast", flush=True)
        return 1
    speed([tuple(int(d) for d in s.split("x")) for s in args.shapes])
    return 0


if __name__ == "__main__":
    sys.exit(main())
