"""Where FP8 pays, layer by layer (one GPU): for every linear shape of a transformer block of the
model in --config (VLM, flow and shallow blocks, at the tokens a step feeds them), forward+backward
times of
  - torch's own FP8 linear (megaflow/fp8.py, parallel.fp8_backend=torch), compiled with an RMSNorm in
    front as in a block (so the input's amax + cast can fuse into the norm), against the same
    compiled norm + bf16 nn.Linear; and eager;
  - the three FP8 GEMMs alone (`torch._scaled_mm` on tensors already in FP8: forward, input
    gradient, weight gradient): the floor; bf16 minus it is what FP8 can gain at most;
  - with --te, Transformer Engine's `te.Linear` in bf16 and in FP8 (delayed scaling, delayed with
    the FP8 weight reused from an earlier micro-batch, current scaling), and the norm fused into the
    first GEMM (`te.LayerNormLinear`, RMSNorm) against our RMSNorm + `te.Linear`.
The gap between an FP8 layer and its GEMMs is the quantisation overhead (casts, transposes, amax).

    python3 tools/bench_fp8_layers.py --config configs/h200_3b.yaml --tokens 8192 [--te]   # H100/H200

Times: CUDA events, median of --reps after --warmup. Needs CUDA (and Transformer Engine for --te).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_attention import timed  # noqa: E402  (median ms of CUDA events: fn, iters, warmup)


def shapes(mcfg, tokens: int, image_tokens: int) -> list:
    """(block, layer, tokens, in_features, out_features) of every distinct block linear."""
    v, f = mcfg.vlm, mcfg.flow
    rows = []
    hd = v.head_dim or v.dim // v.n_heads
    rows += [("vlm", "qkv", tokens, v.dim, (v.n_heads + 2 * v.n_kv_heads) * hd), ("vlm", "o_proj", tokens, v.n_heads * hd, v.dim),
             ("vlm", "gate_up", tokens, v.dim, 2 * v.ffn_dim), ("vlm", "down_proj", tokens, v.ffn_dim, v.dim)]
    rows += [("flow", "qkv", tokens, f.dim, 3 * f.dim), ("flow", "o_proj", tokens, f.dim, f.dim),
             ("flow", "gate_up", tokens, f.dim, 2 * f.ffn_dim), ("flow", "down_proj", tokens, f.ffn_dim, f.dim)]
    s, sf = f.shallow_dim, f.shallow_ffn_dim or 4 * f.shallow_dim
    rows += [("shallow", "qkv", image_tokens, s, 3 * s), ("shallow", "o_proj", image_tokens, s, s),
             ("shallow", "gate_up", image_tokens, s, 2 * sf), ("shallow", "down_proj", image_tokens, sf, s)]
    return rows


def torch_times(m: int, k: int, n: int, warmup: int, reps: int) -> dict:
    """bf16 nn.Linear eager; RMSNorm + bf16 linear compiled; torch's FP8 linear eager and compiled
    (RMSNorm in front); all forward + backward on the same weights and data."""
    from megaflow.fp8 import to_float8
    from megaflow.model.layers import RMSNorm
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    norm = RMSNorm(k).to("cuda", torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def run(f):
        def step():
            f(x).backward(dy)
            x.grad = lin.weight.grad = norm.weight.grad = None
        return step
    out = {"bf16": timed(run(lin), reps, warmup),
           "bf16_norm_compiled": timed(run(torch.compile(lambda t: lin(norm(t)))), reps, warmup)}
    to_float8(lin)
    torch._dynamo.reset()  # the next compile must see the FP8 layer, not reuse the bf16 graph
    out["fp8_eager"] = timed(run(lin), reps, warmup)
    out["fp8_norm_compiled"] = timed(run(torch.compile(lambda t: lin(norm(t)))), reps, warmup)
    out["fp8_gemms"] = gemm_times(x, lin.weight, dy, warmup, reps)
    del lin, norm, x, dy
    return out


def gemm_times(x, w, dy, warmup: int, reps: int) -> float:
    """The three FP8 GEMMs of a linear alone, on tensors already in FP8 (a row-major, b column-major;
    scales of 1)."""
    f8, one = torch.float8_e4m3fn, torch.ones((), device="cuda")
    xq, wq, dyq = x.detach().to(f8), w.detach().to(f8), dy.to(torch.float8_e5m2)
    w_col, dy_t, x_col = wq.t().contiguous().t(), dyq.t().contiguous(), xq.t().contiguous().t()

    def gemms():
        torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16)      # y = x W^T
        torch._scaled_mm(dyq, w_col, one, one, out_dtype=torch.bfloat16)     # dx = dy W
        torch._scaled_mm(dy_t, x_col, one, one, out_dtype=torch.bfloat16)     # dW = dy^T x
    return timed(gemms, reps, warmup)


def layer_times(te, recipes: dict, m: int, k: int, n: int, warmup: int, reps: int) -> dict:
    lin = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step(recipe=None, first=None):
        with te.fp8_autocast(enabled=recipe is not None, fp8_recipe=recipe):
            y = lin(x, is_first_microbatch=first)
        y.backward(dy)
        x.grad = lin.weight.grad = None

    out = {"bf16": timed(step, reps, warmup), "delayed": timed(lambda: step(recipes["delayed"]), reps, warmup)}
    calls = iter(range(10 ** 9))
    out["delayed_cached"] = timed(lambda: step(recipes["delayed"], next(calls) == 0), reps, warmup)
    out["current"] = timed(lambda: step(recipes["current"]), reps, warmup)
    del lin, x, dy
    return out


def norm_fusion(te, recipe, m: int, k: int, n: int, eps: float, warmup: int, reps: int) -> dict:
    """FP8 forward+backward of RMSNorm then the linear: TE's fused LayerNormLinear vs ours + te.Linear."""
    from megaflow.model.layers import RMSNorm
    fused = te.LayerNormLinear(k, n, bias=False, normalization="RMSNorm", eps=eps, params_dtype=torch.bfloat16,
                               device="cuda")
    norm = RMSNorm(k, eps).to("cuda", torch.bfloat16)
    lin = te.Linear(k, n, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def run(f):
        def step():
            with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                y = f(x)
            y.backward(dy)
            x.grad = None
        return step
    out = {"fused": timed(run(fused), reps, warmup), "separate": timed(run(lambda t: lin(norm(t))), reps, warmup)}
    del fused, norm, lin, x, dy
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/h200_3b.yaml")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens a step feeds the VLM and flow blocks")
    ap.add_argument("--image-tokens", type=int, default=3584, help="tokens a step feeds the shallow blocks")
    ap.add_argument("--blocks", default="vlm,flow,shallow", help="which blocks' linears, comma-separated")
    ap.add_argument("--te", action="store_true", help="also Transformer Engine's layers (needs TE)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_layers: needs a CUDA GPU with FP8 (H100/H200)", file=sys.stderr)
        return 2
    te = recipes = None
    if args.te:
        from parallel.backend import import_te
        te = import_te()
        from transformer_engine.common import recipe as te_recipe
        recipes = {"delayed": te_recipe.DelayedScaling(), "current": te_recipe.Float8CurrentScaling()}
    from megaflow.config import load_config
    mcfg = load_config(args.config).model
    rows = []
    print(f"{'block':8s} {'layer':9s} {'M x K -> N':>22s} {'bf16':>7s} {'GEMMs':>7s} {'n+bf16 c':>8s} {'n+fp8 c':>8s} "
          f"{'x comp':>6s} {'fp8 eag':>7s} {'ovh c':>6s}" + (f" {'te dl':>6s} {'te cur':>6s} {'x te':>5s}" if te else ""),
          flush=True)
    blocks = args.blocks.split(",")
    for block, layer, m, k, n in shapes(mcfg, args.tokens, args.image_tokens):
        if block not in blocks:
            continue
        t = torch_times(m, k, n, args.warmup, args.reps)
        if te is not None:
            t.update({f"te_{k2}": v for k2, v in layer_times(te, recipes, m, k, n, args.warmup, args.reps).items()})
        t.update(block=block, layer=layer, m=m, k=k, n=n)
        rows.append(t)
        line = (f"{block:8s} {layer:9s} {f'{m} x {k} -> {n}':>22s} {t['bf16']:7.3f} {t['fp8_gemms']:7.3f} "
                f"{t['bf16_norm_compiled']:8.3f} {t['fp8_norm_compiled']:8.3f} "
                f"{t['bf16_norm_compiled'] / t['fp8_norm_compiled']:6.2f} {t['fp8_eager']:7.3f} "
                f"{t['fp8_norm_compiled'] - t['fp8_gemms'] - (t['bf16_norm_compiled'] - t['bf16']):6.3f}")
        if te is not None:
            line += f" {t['te_delayed']:6.3f} {t['te_current']:6.3f} {t['te_bf16'] / t['te_delayed']:5.2f}"
        print(line, flush=True)
        torch._dynamo.reset()  # each shape compiles its own graphs; drop the last ones
    keys = ["bf16", "fp8_gemms", "bf16_norm_compiled", "fp8_norm_compiled", "fp8_eager"]
    tot = {k: sum(r[k] for r in rows) for k in keys}
    print("all listed linears, one layer each: " + ", ".join(f"{k} {v:.2f} ms" for k, v in tot.items())
          + f"; compiled FP8 vs compiled bf16 {tot['bf16_norm_compiled'] / tot['fp8_norm_compiled']:.2f}x")
    out = {"rows": rows}
    if te is not None:
        v = mcfg.vlm
        fusion = norm_fusion(te, recipes["delayed"], args.tokens, v.dim, rows[0]["n"], v.norm_eps, args.warmup, args.reps)
        print(f"RMSNorm + VLM qkv in FP8: te.LayerNormLinear {fusion['fused']:.3f} ms, "
              f"our RMSNorm + te.Linear {fusion['separate']:.3f} ms ({fusion['separate'] / fusion['fused']:.2f}x)")
        out["norm_fusion"] = fusion
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
