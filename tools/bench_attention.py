"""Attention over packed rows: document-masked FlexAttention vs the dense boolean mask vs plain causal.

    python tools/bench_attention.py                       # on a GPU: T=4096, ~8 documents per row, 16 x 128 heads
    python tools/bench_attention.py --seq-len 2048 --docs 4 --rows 8 --json out.json

Rows of T tokens hold about --docs documents each (random lengths, seeded; the last few % of a row
is padding, doc_id -1, as the packer leaves it). Three kernels on the same q, k, v (bf16):
  flex    megaflow.model.masks: a BlockMask of causal AND same-document (built once, timed
          separately) + compiled flex_attention; fully masked blocks are skipped
  dense   the (B, 1, T, T) boolean mask + SDPA (what training used before on every device)
  causal  SDPA is_causal=True (flash): the upper bound, ignoring document boundaries
Forward and forward+backward are timed with CUDA events (median of --iters after --warmup).
Before timing, flex is checked against dense: outputs and gradients of q, k, v in fp32 (max abs
difference over max(1, max |dense|) must be <= --fp32-tol, 1e-5 by default) and reported in bf16. It prints a
table and optional JSON; it does not measure the model around attention (tools/profile_step.py).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F


def doc_ids_for(rows: int, seq_len: int, docs: int, seed: int, device) -> torch.Tensor:
    """(rows, T) doc ids: ~`docs` documents of random length per row, then ~3% padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((rows, seq_len), -1, dtype=torch.long)
    real = int(seq_len * 0.97)
    for r in range(rows):
        weights = torch.rand(docs, generator=g) + 0.25
        cuts = (weights.cumsum(0) / weights.sum() * real).long().tolist()
        start = 0
        for d, end in enumerate(cuts):
            out[r, start:end] = d
            start = end
    return out.to(device)


def timed(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(doc_ids, heads: int, head_dim: int, tol: float) -> dict:
    """flex vs dense on the same inputs: max abs differences of output and q/k/v gradients (fp32),
    and the relative output error in bf16."""
    from megaflow.model.masks import attend, document_mask, use_kernel
    B, T = doc_ids.shape
    g = torch.Generator(device=doc_ids.device).manual_seed(0)
    base = [torch.randn(B, heads, T, head_dim, device=doc_ids.device, generator=g) for _ in range(3)]
    grad_out = torch.randn(B, heads, T, head_dim, device=doc_ids.device, generator=g)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        outs, grads = {}, {}
        for kernel in ("flex", "dense"):
            q, k, v = (x.detach().clone().to(dtype).requires_grad_() for x in base)
            with use_kernel(kernel):
                mask = document_mask(doc_ids, T, T, doc_ids.device)
            y = attend(q, k, v, mask)
            y.backward(grad_out.to(dtype))
            outs[kernel], grads[kernel] = y.detach().float(), [x.grad.float() for x in (q, k, v)]
        name = "fp32" if dtype == torch.float32 else "bf16"
        pairs = [(outs["flex"], outs["dense"])] + list(zip(grads["flex"], grads["dense"]))
        diffs = [float((a - b).abs().max()) for a, b in pairs]
        scales = [max(1.0, float(b.abs().max())) for _, b in pairs]  # errors relative to the tensor's scale
        result[f"{name}_out_max_abs"], result[f"{name}_grad_max_abs"] = diffs[0], max(diffs[1:])
        result[f"{name}_max_rel_to_scale"] = max(d / s for d, s in zip(diffs, scales))
    result["fp32_ok"] = result["fp32_max_rel_to_scale"] <= tol
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--docs", type=int, default=8, help="documents per row (about)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--fp32-tol", type=float, default=1e-5)
    ap.add_argument("--check-rows", type=int, default=1, help="rows of the fp32/bf16 equality check")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention: needs a CUDA GPU (compiled FlexAttention has no CPU backward)")
    from megaflow.model.masks import attend, document_mask, use_kernel
    device = torch.device("cuda")
    B, T, H, hd = args.rows, args.seq_len, args.heads, args.head_dim
    doc_ids = doc_ids_for(B, T, args.docs, 0, device)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": B, "seq_len": T,
              "docs_per_row": args.docs, "heads": H, "head_dim": hd, "dtype": "bf16",
              "check": check(doc_ids[: args.check_rows], H, hd, args.fp32_tol)}
    print(json.dumps({"check": result["check"]}), flush=True)

    with use_kernel("flex"):
        flex_mask = document_mask(doc_ids, T, T, device)
        result["flex_mask_build_ms"] = timed(lambda: document_mask(doc_ids, T, T, device), args.iters, 2)
    with use_kernel("dense"):
        dense_mask = document_mask(doc_ids, T, T, device)
    kernels = {"flex": lambda q, k, v: attend(q, k, v, flex_mask),
               "dense": lambda q, k, v: attend(q, k, v, dense_mask),
               "causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    q, k, v = (torch.randn(B, H, T, hd, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    # real (same-document causal) pairs over all causal pairs: the share of work flex must do
    same = sum(int(n) * (int(n) + 1) // 2 for row in doc_ids for n in torch.bincount(row[row >= 0]))
    result["doc_pairs_over_causal_pairs"] = same / (B * T * (T + 1) // 2)
    times = {}
    for name, fn in kernels.items():
        def fwd():
            with torch.no_grad():
                fn(q, k, v)

        def fwd_bwd():
            fn(q, k, v).backward(grad_out)
        times[name] = {"fwd_ms": timed(fwd, args.iters, args.warmup), "fwd_bwd_ms": timed(fwd_bwd, args.iters, args.warmup)}
        print(json.dumps({name: times[name]}), flush=True)
    result["times"] = times
    print(f"\nattention, {B} rows x T={T}, ~{args.docs} documents per row, {H} heads x {hd}, bf16, "
          f"{result['device']}")
    print("| kernel | forward ms | forward+backward ms | vs dense (fwd+bwd) |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t['fwd_ms']:.3f} | {t['fwd_bwd_ms']:.3f} | {times['dense']['fwd_bwd_ms'] / t['fwd_bwd_ms']:.2f}x |")
    print(f"flex BlockMask build: {result['flex_mask_build_ms']:.3f} ms per batch (once, shared by every layer); "
          f"same-document pairs = {result['doc_pairs_over_causal_pairs']:.3f} of causal pairs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not result["check"]["fp32_ok"]:
        raise SystemExit(f"bench_attention: flex != dense beyond {args.fp32_tol} in fp32: {result['check']}")
    return result


if __name__ == "__main__":
    main()
