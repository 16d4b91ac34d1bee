"""The 12 GEMMs of one TarFlow layer at ml-tarflow's shape (configs/tarflow_imagenet64.yaml: width 768,
QKV 2304, SwiGLU 2 x 2128; 32 images x 1,024 tokens), bf16: torch's default BLAS path (cuBLAS) against
its cuBLASLt path (`torch.backends.cuda.preferred_blas_library("cublaslt")`, process-wide). (PyTorch's
TunableOp would time candidate algorithms, but on CUDA builds its only candidate is the default cuBLAS
call: its docs.)

    python3 tools/device/tarflow_gemms.py [--tokens 32768] [--iters 20]

Per linear (x (M, in), W (out, in), dy (M, out)): forward x @ W^T, input gradient dy @ W, weight
gradient dy^T @ x, as torch.mm gets them from F.linear's autograd (transposed views, no copies).
Prints each GEMM's ms and TFLOP/s both ways, and the layer's sum x 64 layers = GEMM ms a step.
"""
from __future__ import annotations

import argparse

import torch

from tools.bench_attention import timed

LINEARS = {"qkv": (768, 2304), "o_proj": (768, 768), "gate_up": (768, 4256), "down_proj": (2128, 768)}


def gemms(M: int) -> list:
    """[(name, a, b)] for torch.mm(a, b): each linear's forward, input gradient and weight gradient."""
    out = []
    for name, (fin, fout) in LINEARS.items():
        x, w, dy = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((M, fin), (fout, fin), (M, fout)))
        out += [(f"{name} fwd", x, w.t()), (f"{name} dgrad", dy, w), (f"{name} wgrad", dy.t(), x)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layers", type=int, default=64)
    a = ap.parse_args()
    cases = gemms(a.tokens)
    default = [timed(lambda: torch.mm(x, y), a.iters, 3) for _, x, y in cases]
    lt = [float("nan")] * len(cases)
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        lt = [timed(lambda: torch.mm(x, y), a.iters, 3) for _, x, y in cases]
    except Exception as e:  # noqa: BLE001 - report, keep the default column
        print(f"cuBLASLt path failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
    for (name, x, y), d, t in zip(cases, default, lt):
        flop = 2 * x.shape[0] * x.shape[1] * y.shape[1]
        print(f"{name:16s} {tuple(x.shape)} @ {tuple(y.shape)}: cuBLAS {d:.3f} ms ({flop / d / 1e9:.0f} TFLOP/s), "
              f"cuBLASLt {t:.3f} ms ({flop / t / 1e9:.0f} TFLOP/s)", flush=True)
    print(f"layer: cuBLAS {sum(default):.3f} ms, cuBLASLt {sum(lt):.3f} ms; x {a.layers} layers: "
          f"{a.layers * sum(default):.1f} / {a.layers * sum(lt):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
