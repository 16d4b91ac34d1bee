"""Micro-measurements behind the h200_1b step (issue 13), one process on one GPU:
  1. megaflow/flat_adamw.py's Triton kernel equals its torch definition (fresh random buffers, an
     odd length, clipping scale, weight decay on some elements, a skipped step writes nothing);
  2. MainWeights.clip_and_step on configs/h200_1b.yaml's parameters: torch's fused AdamW + the bf16
     refresh copy vs the one-pass flat step (ms, median of CUDA-event timings);
  3. causal SDPA with grouped-query heads at the VLM's shape: k/v repeated to every query head
     (what layers.Attention does) vs SDPA's enable_gqa, forward + backward, compiled;
  4. SwiGLU of a fused gate/up output at the VLM's shape: chunk(2) vs a (..., 2, F) view vs
     megaflow/model/swiglu.py's one-pass backward, compiled forward + backward, against the bytes
     it must move; the one-pass kernel alone.
    python3 tools/device/step_micro.py [--config configs/h200_1b.yaml]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.bench_attention import timed as timed_ms  # noqa: E402


def timed(fn, n: int = 20) -> float:
    """Median ms of fn() over n runs (CUDA events), after 3 untimed ones."""
    return timed_ms(fn, n, 3)


def check_kernel() -> None:
    from megaflow.flat_adamw import adamw_reference, adamw_triton
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 10_000_019

    def bufs():
        r = lambda: torch.randn(n, device="cuda", generator=g)  # noqa: E731
        return [r(), r() * 1e-2, r() * 1e-3, r().square() * 1e-5, torch.empty(n, device="cuda", dtype=torch.bfloat16)]
    base = bufs()
    decay = torch.rand(n, device="cuda", generator=g) < 0.7
    step = torch.tensor(7.0, device="cuda")
    args = (step, 3e-4, 0.9, 0.95, 1e-8, 0.1)
    for skip in (0.0, 1.0):
        ref, tri = [b.clone() for b in base], [b.clone() for b in base]
        for out, fn in ((ref, adamw_reference), (tri, adamw_triton)):
            fn(*out[:4], out[4], decay, *args, torch.tensor(2.5, device="cuda"), torch.tensor(skip, device="cuda"))
        errs = [float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)) for a, b in zip(tri[:4], ref[:4])]
        same_bf16 = float((tri[4].float() - ref[4].float()).abs().max()) if not skip else float("nan")
        untouched = all(torch.equal(a, b) for a, b in zip(tri[:4], base[:4])) if skip else None
        print(f"flat AdamW kernel vs torch definition (found_inf={skip}): rel err main/m/v/grad {errs}, "
              f"bf16 max diff {same_bf16}, untouched on skip: {untouched}", flush=True)


def optimizer_step(config: str) -> None:
    from megaflow.config import load_config
    from megaflow.model.starflow import build_model
    from megaflow.optim import MainWeights, param_groups
    cfg = load_config(config, [])
    model = build_model(cfg.model, "cuda", seed=0)
    w = MainWeights(model, param_groups(model, cfg.train.weight_decay), cfg.train, torch.bfloat16)
    n = w.flat_main.numel()
    w.flat_main_grad.normal_(0, 1e-3)
    out = {}
    for flat in (False, True, False, True):
        w.flat_step = flat
        out.setdefault(flat, []).append(timed(lambda: w.clip_and_step(1.0), 10))
    bytes_flat = n * (4 * 4 + 1 + 4 * 3 + 2)
    best = {k: min(v) for k, v in out.items()}
    print(f"optimizer step, {n / 1e9:.3f}B parameters (norm + clip + AdamW + bf16 weights): torch fused AdamW + "
          f"copy {best[False]:.2f} ms, flat one-pass {best[True]:.2f} ms ({bytes_flat / best[True] / 1e9:.2f} TB/s "
          f"for the kernel's {bytes_flat / 1e9:.1f} GB, the norm's pass included in the time) [runs {out}]", flush=True)
    del w, model
    torch.cuda.empty_cache()


def gqa(B=16, H=16, Hkv=8, T=1024, hd=128) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(B, Hkv, T, hd, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, generator=g)

    @torch.compile(dynamic=False)
    def repeated(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                              is_causal=True)

    @torch.compile(dynamic=False)
    def native(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    res = {}
    for name, fn in (("repeat_interleave", repeated), ("enable_gqa", native), ("repeat_interleave", repeated)):
        res[name] = timed(lambda: torch.autograd.backward(fn(q, k, v), dy))
    a = repeated(q, k, v)
    err = float((native(q, k, v).float() - a.float()).norm() / a.float().norm())
    print(f"GQA attention fwd+bwd ({B}x{H}/{Hkv} heads x {T} x {hd}): repeat_interleave {res['repeat_interleave']:.3f} ms, "
          f"enable_gqa {res['enable_gqa']:.3f} ms (rel diff {err:.1e})", flush=True)


def swiglu(N=16 * 1024, Fd=5632) -> None:
    from megaflow.model.swiglu import silu_mul, swiglu_backward_triton
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(N, 2 * Fd, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    dy = torch.randn(N, Fd, device="cuda", dtype=torch.bfloat16, generator=g)

    @torch.compile(dynamic=False)
    def chunked(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @torch.compile(dynamic=False)
    def viewed(x):
        gate, up = x.view(N, 2, Fd).unbind(1)
        return F.silu(gate) * up

    one_pass = torch.compile(silu_mul, dynamic=False)  # megaflow/model/swiglu.py: layers.SwiGLU's
    res = {}
    for name, fn in (("chunk", chunked), ("view", viewed), ("one_pass", one_pass), ("chunk", chunked)):
        res[name] = min(res.get(name, 1e9), timed(lambda: torch.autograd.backward(fn(x), dy)))
    bwd = timed(lambda: swiglu_backward_triton(dy, x.detach()))
    moved = (2 * N * 2 * Fd + 2 * N * Fd) + (2 * N * 2 * Fd + 2 * N * Fd + 2 * N * 2 * Fd)  # fwd + bwd bytes, bf16
    bwd_bytes = 2 * N * Fd * 5
    print(f"SwiGLU fwd+bwd ({N} x {Fd}): chunk {res['chunk']:.3f} ms, view {res['view']:.3f} ms, one-pass backward "
          f"{res['one_pass']:.3f} ms; {moved / 1e9:.2f} GB moved at least ({moved / res['chunk'] / 1e6:.0f} GB/s for "
          f"chunk, {moved / res['one_pass'] / 1e6:.0f} for one-pass); the backward kernel alone {bwd:.3f} ms for "
          f"{bwd_bytes / 1e9:.2f} GB ({bwd_bytes / bwd / 1e6:.0f} GB/s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/h200_1b.yaml")
    ap.add_argument("--only", default="kernel,optimizer,gqa,swiglu", help="comma-separated measurements")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    parts = {"kernel": check_kernel, "optimizer": lambda: optimizer_step(args.config), "gqa": gqa, "swiglu": swiglu}
    for name in args.only.split(","):
        try:
            parts[name]()
        except Exception as e:  # noqa: BLE001 - one failing measurement must not hide the others
            print(f"failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
