"""Where FP8 pays, layer by layer (one GPU, Transformer Engine): for every linear shape of a
transformer block of the model in --config (VLM, flow and shallow blocks, at the tokens a step
feeds them), the forward+backward time of `te.Linear` in bf16 and in FP8 (delayed scaling,
delayed with the FP8 weight reused from an earlier micro-batch, current scaling), and the time of
the three FP8 GEMMs alone (`torch._scaled_mm` on tensors already in FP8: forward, input gradient,
weight gradient). The gap between the FP8 layer and its GEMMs is the quantisation overhead (casts,
transposes, amax bookkeeping); bf16 minus the FP8 GEMMs is what FP8 can gain at most. Also the
norm fused into the first GEMM (`te.LayerNormLinear`, RMSNorm) against our RMSNorm + `te.Linear`.

    python3 tools/bench_fp8_layers.py --config configs/h200_3b.yaml --tokens 8192   # H100/H200

Times: CUDA events, median of --reps after --warmup. Needs CUDA and Transformer Engine.
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
    # the three GEMMs alone, on FP8 tensors (a row-major, b column-major; scales of 1)
    f8, one = torch.float8_e4m3fn, torch.ones((), device="cuda")
    xq, wq, dyq = x.detach().to(f8), lin.weight.detach().to(f8), dy.to(f8)
    w_col, dy_t, x_col = wq.t().contiguous().t(), dyq.t().contiguous(), xq.t().contiguous().t()

    def gemms():
        torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16)      # y = x W^T
        torch._scaled_mm(dyq, w_col, one, one, out_dtype=torch.bfloat16)     # dx = dy W
        torch._scaled_mm(dy_t, x_col, one, one, out_dtype=torch.bfloat16)     # dW = dy^T x
    out["fp8_gemms"] = timed(gemms, reps, warmup)
    del lin, x, dy, xq, wq, dyq, w_col, dy_t, x_col
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
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_layers: needs a CUDA GPU with FP8 (H100/H200)", file=sys.stderr)
        return 2
    from parallel.backend import import_te
    te = import_te()
    from transformer_engine.common import recipe as te_recipe
    from megaflow.config import load_config
    mcfg = load_config(args.config).model
    recipes = {"delayed": te_recipe.DelayedScaling(), "current": te_recipe.Float8CurrentScaling()}
    rows = []
    print(f"{'block':8s} {'layer':9s} {'M x K -> N':>22s} {'bf16 ms':>8s} {'fp8 dl':>7s} {'cached':>7s} {'fp8 cur':>7s} "
          f"{'GEMMs':>7s} {'x dl':>5s} {'x cur':>5s} {'quant ovh':>9s} {'gain max':>8s}", flush=True)
    for block, layer, m, k, n in shapes(mcfg, args.tokens, args.image_tokens):
        t = layer_times(te, recipes, m, k, n, args.warmup, args.reps)
        t.update(block=block, layer=layer, m=m, k=k, n=n)
        rows.append(t)
        print(f"{block:8s} {layer:9s} {f'{m} x {k} -> {n}':>22s} {t['bf16']:8.3f} {t['delayed']:7.3f} "
              f"{t['delayed_cached']:7.3f} {t['current']:7.3f} {t['fp8_gemms']:7.3f} {t['bf16'] / t['delayed']:5.2f} "
              f"{t['bf16'] / t['current']:5.2f} {t['delayed'] - t['fp8_gemms']:9.3f} {t['bf16'] - t['fp8_gemms']:8.3f}",
              flush=True)
    tot = {k: sum(r[k] for r in rows) for k in ("bf16", "delayed", "delayed_cached", "current", "fp8_gemms")}
    print(f"all block linears of one layer each: bf16 {tot['bf16']:.2f} ms, FP8 delayed {tot['delayed']:.2f} "
          f"({tot['bf16'] / tot['delayed']:.2f}x), cached weights {tot['delayed_cached']:.2f} "
          f"({tot['bf16'] / tot['delayed_cached']:.2f}x), current {tot['current']:.2f} "
          f"({tot['bf16'] / tot['current']:.2f}x), FP8 GEMMs alone {tot['fp8_gemms']:.2f}")
    v = mcfg.vlm
    fusion = norm_fusion(te, recipes["delayed"], args.tokens, v.dim, rows[0]["n"], v.norm_eps, args.warmup, args.reps)
    print(f"RMSNorm + VLM qkv in FP8: te.LayerNormLinear {fusion['fused']:.3f} ms, "
          f"our RMSNorm + te.Linear {fusion['separate']:.3f} ms ({fusion['separate'] / fusion['fused']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "norm_fusion": fusion}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
