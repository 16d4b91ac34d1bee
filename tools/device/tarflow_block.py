"""One TarFlow layer at apple/ml-tarflow's ImageNet-64 shape, forward + backward, on one GPU: where a
layer's time goes, kernel by kernel (issue 13, the TarFlow row). 64 such layers are 90% of the step.

    python3 tools/device/tarflow_block.py --variant default          # compiled as the step compiles it
    python3 tools/device/tarflow_block.py --variant max-autotune     # inductor GEMM templates + epilogues
    python3 tools/device/tarflow_block.py --kernels none,rope,rope+add_norm   # megaflow's Triton kernels, A/B

The layer is megaflow's own TransformerBlock (width 768, 12 heads of 64, SwiGLU 2128) in bf16 on
(32 images x 1,024 tokens), run through megaflow.speed.block_forward compiled in `--mode`. Prints:
  - fwd+bwd time (median of CUDA-event timings), its TFLOP/s (matmuls + causal attention, counted
    as executed) and the floor of each part: GEMMs at --gemm-tflops, attention as measured;
  - the same fwd+bwd replayed from one CUDA graph (what launch gaps cost a layer);
  - kernel time by category and the top kernels (torch.profiler, 5 iterations);
  - causal cuDNN attention alone with q/k/v laid out as the layer gives them (views of the QKV GEMM's
    output) and contiguous.
Nothing here is used by training; megaflow's layer is imported, not copied.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megaflow.model import layers  # noqa: E402
from megaflow.model.layers import AttnContext, TransformerBlock, rope_tables  # noqa: E402
from megaflow.speed import block_forward  # noqa: E402
from tools.bench_attention import timed  # noqa: E402
from tools.profile_step import kernel_category  # noqa: E402


def _ms(fn) -> float:
    return timed(fn, 20, 3)  # median ms of 20 CUDA-event timings after 3 warm-up calls


def layer_flops(B: int, T: int, dim: int, ffn: int, heads: int, hd: int) -> tuple:
    """(matmul FLOPs, causal attention FLOPs) of one layer's forward + backward as executed."""
    weights = dim * 3 * dim + dim * dim + dim * 2 * ffn + ffn * dim
    return 6.0 * weights * B * T, 3.5 * 2 * B * heads * T * T * hd  # causal: half of 4 B H T^2 hd


def kernel_table(fn, iters: int = 5, top: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per, cats = {}, {}
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        t = e.device_time / iters / 1e3  # ms per iteration
        per[e.name] = per.get(e.name, 0.0) + t
        cats[kernel_category(e.name)] = cats.get(kernel_category(e.name), 0.0) + t
    total = sum(per.values())
    lines = [f"  kernel time {total:.3f} ms per fwd+bwd: " +
             ", ".join(f"{c} {t:.3f} ms ({100 * t / total:.0f}%)" for c, t in sorted(cats.items(), key=lambda kv: -kv[1]))]
    for name, t in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {t:7.3f} ms  {kernel_category(name):26s} {name[:110]}")
    return "\n".join(lines)


def attention_layouts(B: int, T: int, heads: int, hd: int) -> str:
    """Causal SDPA fwd+bwd with q/k/v as views of a (B, T, 3*heads, hd) buffer vs contiguous (B, H, T, hd)."""
    qkv = torch.randn(B, T, 3 * heads, hd, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, heads, T, hd, device="cuda", dtype=torch.bfloat16)
    out = []
    for name, make in (("views of the QKV output", lambda: qkv.transpose(1, 2).split(heads, dim=1)),
                       ("contiguous (B, H, T, hd)", lambda: [t.contiguous() for t in qkv.transpose(1, 2).split(heads, dim=1)])):
        q, k, v = (t.detach().requires_grad_() for t in make())
        fwd = _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        both = _ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), g))
        out.append(f"  attention, {name}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="default", help="default | max-autotune | eager")
    ap.add_argument("--kernels", default="rope+add_norm",
                    help="comma list of runs, each the '+'-joined megaflow.model.layers.CUDA_KERNELS on in it "
                         "(rope: RoPE/QKV kernels, add_norm: add + RMSNorm backward; none: neither)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--gemm-tflops", type=float, default=790.0, help="measured dense bf16 GEMM rate (KINDS.md)")
    ap.add_argument("--attention", action="store_true", help="also time attention alone in two layouts")
    a = ap.parse_args()
    B, T, dim, heads, ffn = a.rows, a.seq_len, 768, 12, 2128
    hd = dim // heads
    torch.manual_seed(0)
    blk = TransformerBlock(dim, heads, heads, hd, ffn).cuda().to(torch.bfloat16)
    blk.init_weights(0.02, 0.02)
    params = list(blk.parameters())
    x = torch.randn(B, T, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, T, dim, device="cuda", dtype=torch.bfloat16)
    ctx = AttnContext(*rope_tables(torch.arange(T, device="cuda")[None], hd, 10000.0, torch.bfloat16))
    if a.variant == "eager":
        fn = block_forward
    else:
        fn = torch.compile(block_forward, dynamic=False, mode="max-autotune-no-cudagraphs" if a.variant == "max-autotune" else None)
    grads = {}
    for kernels in a.kernels.split(","):
        for name in layers.CUDA_KERNELS:  # dynamo guards on them: each setting gets its own graph
            layers.CUDA_KERNELS[name] = name in kernels.split("+")

        def fwd_bwd():
            return torch.autograd.grad(fn(blk, x, ctx), [x] + params, g)

        t0 = time.perf_counter()
        grads[kernels] = fwd_bwd()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = _ms(fwd_bwd)
        mm, attn = layer_flops(B, T, dim, ffn, heads, hd)
        print(f"[{a.variant}, kernels {kernels}] one layer fwd+bwd {ms:.3f} ms ({(mm + attn) / ms / 1e9:.0f} TFLOP/s "
              f"executed; x64 layers = {64 * ms:.0f} ms); GEMM floor at {a.gemm_tflops:.0f} TFLOP/s "
              f"{mm / a.gemm_tflops / 1e9:.3f} ms; first call (compile) {compile_s:.1f} s", flush=True)
        fwd = _ms(lambda: fn(blk, x, ctx).detach())
        print(f"  forward alone {fwd:.3f} ms", flush=True)
        # the same work replayed from one CUDA graph: the launch gaps' share of the layer
        try:
            print(f"  fwd+bwd replayed from one CUDA graph {graphed_ms(fwd_bwd):.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - the kernel table still comes
            print(f"  CUDA graph failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        print(kernel_table(fwd_bwd), flush=True)
    first = next(iter(grads))
    for kernels, got in grads.items():  # the kernels' gradients against the first run's (e.g. inductor's fusions)
        if kernels != first:
            rel = max(float((u.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12))
                      for u, w in zip(got, grads[first]))
            print(f"  gradients, {kernels} vs {first}: largest relative difference {rel:.2e} (bf16)", flush=True)
    if a.attention:
        print(attention_layouts(B, T, heads, hd), flush=True)


def graphed_ms(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _ms(graph.replay)


if __name__ == "__main__":
    main()
