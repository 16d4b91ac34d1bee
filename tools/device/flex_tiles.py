"""FlexAttention's tiles and options at h200_1b's real-data layouts, each row timed as a CUDA graph replay.

    python3 tools/device/flex_tiles.py [--batches 2] [--rows default,safe,tma,...] [--shapes vlm,flow]

One layer's forward + backward under the document BlockMask of 128-token blocks (megaflow.model.masks), q and
k in the (B, T, H, hd) memory order qkv_rope gives, v a strided view of the QKV output (as in the step), the
VLM's 8 k/v heads read in place. Each row replays the layer as one CUDA graph (no launch gaps: the kernels'
own time, as in the graphed step) on the real Fashion-MNIST layouts (tools/device/layouts_h200_1b.json),
the median of the batches' medians, x the layer count (16 VLM, 8 flow) = ms a step. Rows:
  m128        today's default: 128-token mask blocks, inductor's sm90 tiles for hd 128 (fwd 128 x 64, 3 stages,
              8 warps; bwd (64, 128, 128, 64), 3 stages, 8 warps)
  m64         model.mask_block=64 as the model runs it (megaflow.model.masks.FLEX_TILES[64])
  _f{M}x{N}s{S}w{W}   forward tile M x N, S stages, W warps
  _b{M1}x{N1}s{S}w{W} backward tiles (M1, N1, N1, M1), S stages, W warps
  _nof        no forward options: inductor's own forward for the blocks, the backward tiles as set
  _at         flex compiled with mode="max-autotune-no-cudagraphs" (inductor's search; its AUTOTUNE lines on
              stderr name the winner)
  _flash      kernel_options={"BACKEND": "FLASH"}: FlashAttention-4's CuTe DSL kernels (flash_attn.cute, installed
              by tools/device/fa4_setup.sh) run the same BlockMask and mask_mod in place of the Triton templates
and each row's largest difference from m128 (output and q/k/v gradients, bf16; the q-shaped ones on real tokens).
(ROWS_GUARANTEED_SAFE gave NaN differences and USE_TMA was 27% slower on the flow shape: not rows any more.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.device.real13_attn import LAYOUTS, doc_ids_of  # noqa: E402
from tools.device.tarflow_block import graphed_ms  # noqa: E402

ROWS = "m128,m128_f64x64s3w4,m64,m64_b64x64s3w4,m64_b32x64s2w4,m64_b32x32s3w4,m64_b64x64s2w8,m64_at"


def parse(row: str):
    """(mask block, kernel_options or None, autotune?) of a row: m{block} [_f{M}x{N}s{S}w{W}] [_b{M1}x{N1}s{S}w{W}]
    [_at]; 64-token blocks start from megaflow.model.masks.FLEX_TILES[64] (what model.mask_block=64 runs)."""
    from megaflow.model.masks import FLEX_TILES
    parts = row.split("_")
    if not parts[0].startswith("m"):
        raise ValueError(f"row {row!r} does not start with m128 or m64")
    block = int(parts[0][1:])
    opts = dict(FLEX_TILES[block] or {})
    for part in parts[1:]:
        if part == "at":
            continue
        if part == "flash":  # FA4's kernels through inductor's CuTe DSL template: no Triton tiles
            opts = {"BACKEND": "FLASH"}
            continue
        if part == "nof":  # the forward left to inductor (its choice for these blocks), the backward as set
            opts = {k: v for k, v in opts.items() if not k.startswith("fwd_")}
            continue
        m, rest = part[1:].split("x")
        n, rest = rest.split("s")
        st, w = (int(x) for x in rest.split("w"))
        m, n = int(m), int(n)
        if part[0] == "f":
            opts.update(fwd_BLOCK_M=m, fwd_BLOCK_N=n, fwd_num_stages=st, fwd_num_warps=w)
        elif part[0] == "b":
            opts.update(bwd_BLOCK_M1=m, bwd_BLOCK_N1=n, bwd_BLOCK_M2=n, bwd_BLOCK_N2=m, bwd_num_stages=st,
                        bwd_num_warps=w)
        else:
            raise ValueError(f"row {row!r}: part {part!r} is not f..., b... or at")
    tune = parts[-1] == "at"
    return block, (None if tune else opts or None), tune  # autotuned: inductor's own tiles


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--shapes", default="vlm,flow")
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import flex_attention
    from megaflow.model.masks import _compiled_flex, document_block_mask
    torch._dynamo.config.cache_size_limit = 128  # one recompile per row's options
    autotuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    dev, B, T, D = torch.device("cuda"), 16, 1024, 128
    layouts = json.loads(LAYOUTS.read_text())["after"][: args.batches]
    masks = {b: [document_block_mask(doc_ids_of(rows, T).to(dev), b) for rows in layouts] for b in (128, 64)}
    reals = [(doc_ids_of(rows, T) >= 0).to(dev)[:, None, :, None] for rows in layouts]
    totals = {}
    for shape in args.shapes.split(","):
        H, Hkv, layers = {"vlm": (16, 8, 16), "flow": (8, 8, 8)}[shape]
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(B, T, H + 2 * Hkv, D, device=dev, dtype=torch.bfloat16, generator=g)
        q = qkv[:, :, :H].contiguous().transpose(1, 2).requires_grad_()  # (B, H, T, D) in (B, T, H, D) order
        k = qkv[:, :, H:H + Hkv].contiguous().transpose(1, 2).requires_grad_()
        v = qkv[:, :, H + Hkv:].transpose(1, 2).detach().requires_grad_()  # a strided view's layout
        dy = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        ref = {}
        for row in args.rows.split(","):
            try:
                block, opts, tune = parse(row)
                call = autotuned if tune else _compiled_flex
                per, diffs = [], []
                for i, (m, real) in enumerate(zip(masks[block], reals)):
                    def fn(m=m):  # gradients by autograd.grad: no AccumulateGrad node (its stream broke captures)
                        y = call(q, k, v, block_mask=m, enable_gqa=H != Hkv, kernel_options=opts)
                        return (y, *torch.autograd.grad(y, (q, k, v), dy))
                    per.append(graphed_ms(fn))
                    got = [t.detach() for t in fn()]
                    if row == "m128":
                        ref[i] = got
                    elif i in ref:
                        diffs.append(max(float(((a.float() - b.float()).abs() * (real if a.shape[1] == H else 1)).max())
                                         for a, b in zip(got, ref[i])))
                ms = statistics.median(per)
                out = {"block": block, "ms_per_layer": round(ms, 4), "ms_per_step": round(layers * ms, 2),
                       "max_diff_vs_default": max(diffs) if diffs else None}
                totals.setdefault(row, 0.0)
                totals[row] += layers * ms
            except Exception as e:  # noqa: BLE001 - a row failing must not hide the others
                out = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(json.dumps({shape: {row: out}}), flush=True)
    print(json.dumps({"ms_per_step (fwd + bwd, the shapes above)": {r: round(t, 2) for r, t in totals.items()}}),
          flush=True)


if __name__ == "__main__":
    main()
