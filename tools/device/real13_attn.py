"""Document-masked attention at h200_1b's real-data layouts: which kernel, at what cost per step.

    python3 tools/device/real13_attn.py [--batches 4] [--iters 10] [--kernels causal,flex128,...] [--no-shallow] [--no-build]

The rows are the real Fashion-MNIST layouts of tools/device/layouts_h200_1b.json (16 x 1024 tokens,
~140 document pieces of ~112 tokens a batch, ~4% padding). For the two attention shapes of the model
(VLM: 16 heads x 128, its 8 KV heads already repeated as megaflow.model.layers does; flow: 8 x 128),
forward + backward of one layer (CUDA events, median), then x the layer counts (16 VLM, 8 flow) =
attention GPU ms per step:
  causal      SDPA is_causal (cuDNN/flash): what the synthetic batches run (ignores documents)
  flex128     megaflow.model.masks today: a BlockMask (128-token blocks) + compiled flex_attention
  flex64      the same rule with 64-token mask blocks (fails to lower on torch 2.11 with the default
              kernel tiles, which are 128 wide)
  flexgqa     flex128 with the VLM's 8 k/v heads read in place (enable_gqa), as megaflow.model.masks
              runs it since att13 (no repeated copies; the flow's heads are not grouped)
  flex64at    64-token blocks, grouped heads in place, flex_attention compiled with
              mode="max-autotune-no-cudagraphs": its backward's tile choices include 32/64-wide ones
              that divide 64-token blocks (the default sm90 backward tile, 64 x 128 / 128 x 64, does
              not, and kernel_options cannot replace a tile that the divisibility check removed)
  flex64t     64-token blocks, grouped heads in place, as the model runs them with model.mask_block: 64:
              megaflow.model.masks's fixed tiles (FLEX_TILES[64]) through its compiled flex, no autotuning
  t64_M_N_S_W the same with the backward tiles (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2) = (M, N, N, M),
              S stages, W warps (the forward's tiles as FLEX_TILES[64]): which fixed tile to keep
  varlen      torch.nn.attention.varlen.varlen_attn (flash varlen) over the flattened rows, one
              sequence per document piece and one per row's padding tail (cu_seqlens), max_q = T
  varlenS     the same with cu_seqlens padded to a fixed S = B x 32 + 1 entries (empty sequences at
              the end): the static shape a compiled, graphed step needs
Then the shallow flows (2 blocks x 2 layers at 256, compiled couplings as in the step, bf16), forward +
backward replayed as one CUDA graph, on 224 image slots (16 rows x 14: real data's, ~195 of them real), 208 (13 a row),
192 and 112 (synthetic's 7 a row): what the padded image slots cost.
plus the BlockMask build (eager and compiled) per batch, and each kernel's largest difference from
flex128 in bf16. Needs no data pipeline.
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.bench_attention import timed as _timed  # noqa: E402
from tools.device.tarflow_block import graphed_ms  # noqa: E402


def timed(fn, iters: int) -> float:
    return _timed(fn, iters, 3)

LAYOUTS = Path(__file__).with_name("layouts_h200_1b.json")


def doc_ids_of(rows: list, T: int) -> torch.Tensor:
    """(B, T) doc ids of rows of [length, image slots] pieces; -1 after the last piece."""
    out = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, pieces in enumerate(rows):
        start = 0
        for d, (length, _) in enumerate(pieces):
            out[r, start:start + length] = d
            start += length
    return out


def cu_seqlens_of(doc_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths over the flattened rows: each piece and each row's padding tail a sequence."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.flatten()).flatten()
    return torch.cat([idx, torch.tensor([B * T], device=idx.device)]).to(torch.int32)


def padded(cu: torch.Tensor, n: int) -> torch.Tensor:
    """cu_seqlens padded to n entries by repeating its last value (empty sequences)."""
    return torch.cat([cu, cu[-1:].expand(n - len(cu))])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--kernels", default="causal,flex128,flex64,flexgqa,flex64at,varlen,varlenS",
                    help="comma-separated rows to time (default: all)")
    ap.add_argument("--no-shallow", action="store_true", help="skip the shallow flows' rows")
    ap.add_argument("--no-build", action="store_true", help="skip timing the BlockMask build")
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention
    from megaflow.model.masks import FLEX_TILES, _compiled_flex, document_block_mask
    torch._dynamo.config.cache_size_limit = 64  # one recompile of the flex call per tile and shape
    _autotuned_flex = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    dev = torch.device("cuda")
    T = 1024
    layouts = json.loads(LAYOUTS.read_text())["after"][: args.batches]
    docs = [doc_ids_of(rows, T).to(dev) for rows in layouts]
    try:  # causal is window (-1, 0) in newer releases, is_causal in the first ones
        from torch.nn.attention.varlen import varlen_attn
        _VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters \
            else {"is_causal": True}
    except ImportError as e:
        varlen_attn, _VARLEN_CAUSAL = None, {}
        print(f"varlen: not in torch {torch.__version__} ({e})")

    def mask_of(d, block):
        def rule(b, h, q, k):
            return (k <= q) & (d[b, q] == d[b, k])
        return create_block_mask(rule, d.shape[0], None, T, T, device=dev, BLOCK_SIZE=block)

    d0 = docs[0]
    if not args.no_build:
        build = {"eager128": timed(lambda: document_block_mask(d0), args.iters)}
        try:
            build["compiled128"] = timed(lambda: create_block_mask(
                lambda b, h, q, k: (k <= q) & (d0[b, q] == d0[b, k]), 16, None, T, T, device=dev, _compile=True),
                args.iters)
        except Exception as e:  # noqa: BLE001
            build["compiled128"] = f"{type(e).__name__}: {str(e)[:120]}"
        print(json.dumps({"block_mask_build_ms": build}), flush=True)
    results = {}
    for name, H, layers in (("vlm", 16, 16), ("flow", 8, 8)):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(16, H, T, 128, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        go = torch.randn(16, H, T, 128, device=dev, dtype=torch.bfloat16, generator=g)
        row = {}
        kv_heads = 8 if name == "vlm" else H  # h200_1b's VLM: 16 query heads over 8 k/v heads
        kg, vg = (x.detach()[:, ::H // kv_heads].clone().requires_grad_() for x in (k, v))  # (B, Hkv, T, hd)
        for kname in args.kernels.split(","):
            per_batch, diffs = [], []
            try:
                for d in docs:
                    if kname == "causal":
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                    elif kname == "flexgqa":
                        m = mask_of(d, 128)
                        fn = (lambda m=m: _compiled_flex(q, kg, vg, block_mask=m, enable_gqa=kv_heads != H))
                    elif kname == "flex64t" or kname.startswith("t64_"):
                        m, tiles = document_block_mask(d, 64), dict(FLEX_TILES[64])
                        if kname.startswith("t64_"):
                            bm, bn, st, wa = (int(x) for x in kname.split("_")[1:])
                            tiles.update(bwd_BLOCK_M1=bm, bwd_BLOCK_N1=bn, bwd_BLOCK_M2=bn, bwd_BLOCK_N2=bm,
                                         bwd_num_stages=st, bwd_num_warps=wa)
                        fn = (lambda m=m, t=tiles: _compiled_flex(q, kg, vg, block_mask=m, enable_gqa=kv_heads != H,
                                                                   kernel_options=t))
                    elif kname == "flex64at":
                        m = mask_of(d, 64)
                        fn = (lambda m=m: _autotuned_flex(q, kg, vg, block_mask=m, enable_gqa=kv_heads != H))
                    elif kname.startswith("flex"):
                        m = mask_of(d, int(kname[4:]))
                        fn = (lambda m=m: _compiled_flex(q, k, v, block_mask=m))
                    else:
                        if varlen_attn is None:
                            raise RuntimeError("no varlen_attn")
                        cu = cu_seqlens_of(d) if kname == "varlen" else padded(cu_seqlens_of(d), 16 * 32 + 1)

                        def fn(cu=cu):
                            flat = [x.transpose(1, 2).reshape(16 * T, H, 128) for x in (q, k, v)]  # (B*T, H, hd)
                            y = varlen_attn(*flat, cu, cu, T, T, **_VARLEN_CAUSAL)
                            return y.view(16, T, H, 128).transpose(1, 2)  # (B, H, T, hd)
                    per_batch.append(timed(lambda: fn().backward(go), args.iters))
                    if kname != "flex128":  # the reference: flex128 over the grouped heads repeated
                        kr, vr = (x.repeat_interleave(H // kv_heads, 1) for x in (kg, vg)) if "gqa" in kname \
                            or kname.startswith(("flex64at", "flex64t", "t64_")) else (k, v)
                        ref = _compiled_flex(q, kr, vr, block_mask=mask_of(d, 128))
                        real = (d >= 0)[:, None, :, None]
                        diffs.append(float(((fn() - ref).abs() * real).max()))
                row[kname] = {"fwd_bwd_ms_per_layer": round(statistics.median(per_batch), 3),
                              "ms_per_step": round(layers * statistics.median(per_batch), 2),
                              "max_diff_vs_flex128_real_rows": max(diffs) if diffs else 0.0}
            except Exception as e:  # noqa: BLE001 - one kernel failing must not hide the others
                row[kname] = {"error": f"{type(e).__name__}: {str(e)[:700]}"}  # long enough to name the lowering (fwd or bwd)
            print(json.dumps({name: {kname: row[kname]}}), flush=True)
        results[name] = row
    total = {k: round(sum(results[s][k].get("ms_per_step", float("nan")) for s in results), 2)
             for k in results["vlm"]}
    print(json.dumps({"attention_ms_per_step_fwd_bwd (16 VLM + 8 flow layers)": total}), flush=True)
    if not args.no_shallow:
        shallow_flows(args.iters)


def shallow_flows(iters: int) -> None:
    from megaflow.config import load_config
    from megaflow.model.flow import ShallowFlows
    from megaflow.speed import apply_compile
    mc = load_config("configs/h200_1b.yaml", []).model
    f, N, D = mc.flow, mc.fae.n_tokens, mc.fae.latent_dim
    torch.manual_seed(0)
    flows = ShallowFlows(f.n_shallow, D, N, f.shallow_dim, f.shallow_heads, f.shallow_layers, f.clip, f.norm_eps,
                         f.shallow_ffn_dim).cuda().to(torch.bfloat16)
    for p in flows.parameters():
        torch.nn.init.normal_(p, std=0.02)
    apply_compile(flows, scope="unit")
    out = {}
    for M in (224, 208, 192, 112):
        try:
            x = torch.randn(M, N, D, device="cuda")

            def step():
                y, ld, sq = flows(x)
                (y.float().square().sum() + ld.sum() + sq.sum()).backward()
            out[M] = {"graphed_ms": round(graphed_ms(step), 3), "eager_ms": round(timed(step, iters), 3)}
        except Exception as e:  # noqa: BLE001
            out[M] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(json.dumps({"shallow_flows_fwd_bwd": {M: out[M]}}), flush=True)


if __name__ == "__main__":
    main()
