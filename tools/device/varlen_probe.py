"""Document-masked attention at h200_1b's real layouts: FlexAttention (today's kernel) vs flash varlen.

    python3 tools/device/varlen_probe.py [--batches 3] [--iters 10]

One layer forward + backward (CUDA events, median over the batches' medians), VLM shape (16 query heads
over 8 k/v heads, hd 128) and flow shape (8 x 128), 16 rows x 1,024 tokens of the real Fashion-MNIST
layouts (tools/device/layouts_h200_1b.json). q, k, v are (B*T, H, hd) views of (B, T, H, hd) tensors,
the layout the QKV GEMM gives; flex gets the same storage as (B, H, T, hd) views.
  flex       megaflow.model.masks today: BlockMask of 128-token blocks, compiled flex, grouped heads in place
  fa_exact   torch.ops.aten._flash_attention_forward/backward (FA2 varlen), one sequence per piece and per
             row's padding tail, max_len = the batch's longest: the kernel's best case (host-known shapes)
  fa_S{P}_{M} the same over a fixed cu_seqlens of B*P+1 entries (empty sequences at the end, as a CUDA graph
             needs) and max_len M: the grid is ceil(M/128) x B*P x heads whatever the batch holds
Each FA row's largest output / gradient difference from flex on real tokens (bf16) is printed.
Standalone figures only: in the graphed h200_1b step flash varlen (S16, max_len 256) measured 2.7 ms a step
SLOWER than flex (docs/benchmarks.md, "The fast step, round 10"), so the model keeps FlexAttention.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.bench_attention import timed  # noqa: E402
from tools.device.real13_attn import LAYOUTS, doc_ids_of  # noqa: E402


def cu_static(doc_ids: torch.Tensor, slots: int) -> torch.Tensor:
    """(slots+1,) int32 cumulative starts of the flattened rows' sequences (a piece, or a row's padding
    tail); sequences past the batch's count are empty (start = B*T). Static shapes only: searchsorted."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    seq = torch.cumsum(starts.flatten().to(torch.int32), 0) - 1  # (B*T,) sequence of each token
    want = torch.arange(slots + 1, device=doc_ids.device, dtype=torch.int32)
    return torch.searchsorted(seq, want).to(torch.int32)


class FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            go.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused)
        return dq, dk, dv, None, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", default="flex,fa_exact,fa_S32_1024,fa_S17_1024,fa_S32_256,fa_S12_256")
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask
    from megaflow.model.masks import _compiled_flex
    dev, B, T, D = torch.device("cuda"), 16, 1024, 128
    layouts = json.loads(LAYOUTS.read_text())["after"][: args.batches]
    docs = [doc_ids_of(rows, T).to(dev) for rows in layouts]
    print(json.dumps({"torch": torch.__version__, "sequences_a_batch": [int(cu_static(d, B * T).ne(B * T).sum())
                                                                         for d in docs]}), flush=True)
    results = {}
    for name, H, Hkv, layers in (("vlm", 16, 8, 16), ("flow", 8, 8, 8)):
        g = torch.Generator(device=dev).manual_seed(0)
        qb, kb, vb = (torch.randn(B, T, h, D, device=dev, dtype=torch.bfloat16, generator=g)
                      for h in (H, Hkv, Hkv))
        go = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        row = {}
        ref_cache = {}
        for rname in args.rows.split(","):
            per, diffs = [], []
            try:
                for i, d in enumerate(docs):
                    q, k, v = (x.clone().requires_grad_() for x in (qb, kb, vb))
                    if rname == "flex":
                        m = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (d[b, qi] == d[b, ki]), B, None, T, T,
                                              device=dev)

                        def fn(m=m, q=q, k=k, v=v):
                            o = _compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=m,
                                               enable_gqa=H != Hkv)
                            return o.transpose(1, 2)  # (B, T, H, D)
                    else:
                        if rname == "fa_exact":
                            cu = cu_static(d, B * T)
                            n = int(cu.ne(B * T).sum())
                            cu = cu[: n + 1].contiguous()
                            max_len = int((cu[1:] - cu[:-1]).max())
                        else:
                            p, max_len = (int(x) for x in rname[4:].split("_"))
                            cu = cu_static(d, B * p)
                            if int(cu[-1]) != B * T:
                                raise RuntimeError(f"{int(cu.ne(B * T).sum())} sequences > {B * p} slots")

                        def fn(cu=cu, max_len=max_len, q=q, k=k, v=v):
                            o = FlashVarlen.apply(q.view(B * T, H, D), k.view(B * T, Hkv, D), v.view(B * T, Hkv, D),
                                                  cu, max_len)
                            return o.view(B, T, H, D)
                    per.append(timed(lambda: fn().backward(go), args.iters, 3))
                    q.grad = k.grad = v.grad = None
                    o = fn()
                    o.backward(go)
                    got = (o.detach(), q.grad, k.grad, v.grad)
                    real = (d >= 0)[..., None, None]
                    if rname == "flex":
                        ref_cache[i] = got
                    elif i in ref_cache:
                        diffs.append(max(float(((a.float() - b.float()).abs() * real).max())
                                         for a, b in zip(got, ref_cache[i])))
                row[rname] = {"fwd_bwd_ms_per_layer": round(statistics.median(per), 4),
                              "ms_per_step": round(layers * statistics.median(per), 2),
                              "max_diff_vs_flex (out, dq, dk, dv; real tokens)": max(diffs) if diffs else None}
            except Exception as e:  # noqa: BLE001 - one row failing must not hide the others
                row[rname] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
            print(json.dumps({name: {rname: row[rname]}}), flush=True)
        results[name] = row
    total = {r: round(sum(results[s][r].get("ms_per_step", float("nan")) for s in results), 2) for r in results["vlm"]}
    print(json.dumps({"attention_ms_per_step (16 VLM + 8 flow layers, fwd + bwd)": total}), flush=True)


if __name__ == "__main__":
    main()
