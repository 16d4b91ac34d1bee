"""What cuDNN's variable-length attention (aten._cudnn_attention_forward/backward with cum_seq) accepts on this
machine: one case a process (an illegal address poisons the process), each against an fp32 reference.

    python3 tools/device/cudnn_varlen_diag.py CASE      (or: all, which runs every case in its own process)

A case is a name of `key=value` parts joined by commas, e.g. `gqa=1,kv_view=1,empty=8,max=256,graph=1`:
  gqa      k/v heads 8 under 16 query heads (0: 16 and 16)
  kv_view  k and v strided views of one QKV tensor, as the model's qkv_rope gives them (0: contiguous)
  empty    trailing empty sequences in cum_seq (the static slots a CUDA graph needs)
  max      the max_q = max_k bound handed to cuDNN (0: the true longest sequence)
  graph    capture forward + backward in a CUDA graph and replay it
  bwd      run the backward (0: forward only)
  real     the real layouts of h200_1b (16 x 1,024 tokens of tools/device/layouts_h200_1b.json) instead of 4 x 512
Prints one JSON line: the largest output / gradient errors (relative to the reference's largest value), the
log-sum-exp's shape, the kernel time (CUDA events) and any error.

Measured on the H200 (torch 2.11 + cuDNN 9.19, docs/benchmarks.md "The fast step, round 11"): the forward is right
(0.2% error) but takes ~45 ms for 2,048 tokens; the backward is wrong (dq off by 9x its scale, dk 30%, NaN with
grouped k/v heads); k and v as strided views of the QKV output fault (illegal address). torch's own
`varlen_attn` keeps this backend off (`_should_use_cudnn` returns False). So megaflow keeps FlexAttention for
packed documents; this script says when a later torch/cuDNN makes the path worth building.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CASES = ["gqa=0,kv_view=0,empty=0,max=0,bwd=0", "gqa=0,kv_view=0,empty=0,max=0", "gqa=1,kv_view=0,empty=0,max=0",
         "gqa=1,kv_view=1,empty=0,max=0", "gqa=1,kv_view=1,empty=0,max=256", "gqa=1,kv_view=1,empty=8,max=256",
         "gqa=1,kv_view=1,empty=0,max=256,graph=1", "gqa=1,kv_view=1,empty=8,max=256,graph=1",
         "gqa=1,kv_view=1,empty=0,max=0,real=1", "gqa=1,kv_view=1,empty=64,max=256,real=1",
         "gqa=1,kv_view=1,empty=64,max=256,real=1,graph=1"]


def layout(real: bool, g: torch.Generator) -> torch.Tensor:
    if real:
        from tools.device.real13_attn import LAYOUTS, doc_ids_of
        return doc_ids_of(json.loads(LAYOUTS.read_text())["after"][0], 1024)
    B, T = 4, 512
    doc_ids = torch.full((B, T), -1)
    for r in range(B):
        start, d = 0, 0
        while start < T - 40 * (r % 2):
            n = int(torch.randint(30, 200, (1,), generator=g))
            doc_ids[r, start:start + n], start, d = d, start + n, d + 1
    return doc_ids


def run(case: str) -> dict:
    o = {k: int(v) for k, v in (p.split("=") for p in case.split(","))}
    g = torch.Generator().manual_seed(0)
    doc_ids = layout(bool(o.get("real")), g)
    B, T = doc_ids.shape
    Hq, Hkv, hd = 16, (8 if o.get("gqa", 1) else 16), 128
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    lengths = torch.diff(torch.cat([idx, torch.tensor([B * T])]))
    cu = torch.cat([idx, torch.full((o.get("empty", 0) + 1,), B * T)]).to(torch.int32).cuda()
    max_len = o.get("max", 0) or int(lengths.max())
    qkv = torch.randn(B * T, Hq + 2 * Hkv, hd, device="cuda", dtype=torch.bfloat16)
    if o.get("kv_view", 1):
        q = qkv[:, :Hq].contiguous()
        k, v = qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    else:
        q, k, v = (qkv[:, a:b].contiguous() for a, b in ((0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, Hq + 2 * Hkv)))
    dout = torch.randn(B * T, Hq, hd, device="cuda", dtype=torch.bfloat16)
    res = {"case": case, "sequences": int(idx.numel()), "slots": int(cu.numel() - 1), "max_len": max_len,
           "longest": int(lengths.max())}

    def fwd_bwd():
        out, lse = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True,
                                                           False)[:2]
        if not o.get("bwd", 1):
            return out, lse, None
        e = q.new_empty(0)
        grads = torch.ops.aten._cudnn_attention_backward(dout, q, k, v, out, lse, e, e, None, cu, cu, max_len, max_len,
                                                         0.0, True)
        return out, lse, grads

    try:
        out, lse, grads = fwd_bwd()
        torch.cuda.synchronize()
        res["lse_shape"], res["lse_stride"] = list(lse.shape), list(lse.stride())
        res["out_stride"] = list(out.stride())
        if grads is not None:
            res["grad_strides"] = [list(x.stride()) for x in grads]
        # reference: dense SDPA in fp32 under the document rule
        from megaflow.model.layers import attention_mask
        allow = attention_mask(doc_ids, T, T, "cpu").cuda()
        qr, kr, vr = (x.detach().float().view(B, T, -1, hd).transpose(1, 2).requires_grad_() for x in (q, k, v))
        rep = Hq // Hkv
        y = F.scaled_dot_product_attention(qr, kr.repeat_interleave(rep, 1), vr.repeat_interleave(rep, 1), attn_mask=allow)
        y.backward(dout.float().view(B, T, Hq, hd).transpose(1, 2))
        real = (doc_ids >= 0).cuda().reshape(-1)[:, None, None]
        want = [y.transpose(1, 2).reshape(B * T, Hq, hd)] + [t.grad.transpose(1, 2).reshape(B * T, -1, hd) for t in (qr, kr, vr)]
        got = [out] + (list(grads) if grads is not None else [])
        res["errors"] = [round(float(((a.float() - b) * (real if a.shape[1] == Hq else 1)).abs().max()
                                     / b.abs().max()), 5) for a, b in zip(got, want)]
        res["finite"] = all(bool(torch.isfinite(a).all()) for a in got)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            fwd_bwd()
        start.record()
        for _ in range(10):
            fwd_bwd()
        end.record()
        torch.cuda.synchronize()
        res["eager_ms"] = round(start.elapsed_time(end) / 10, 4)
        if o.get("graph"):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fwd_bwd()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = fwd_bwd()
            graph.replay()
            torch.cuda.synchronize()
            res["graph_equal"] = bool(torch.equal(static[0], out))
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            res["graph_ms"] = round(start.elapsed_time(end) / 10, 4)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


if __name__ == "__main__":
    if sys.argv[1] == "all":
        for case in CASES:
            p = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=120)
            line = [x for x in p.stdout.splitlines() if x.startswith("{")]
            print(line[-1] if line else json.dumps({"case": case, "rc": p.returncode, "stderr": p.stderr[-400:]}),
                  flush=True)
    else:
        print(json.dumps(run(sys.argv[1])), flush=True)
