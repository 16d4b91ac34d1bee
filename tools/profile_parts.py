"""Time and MFU per part of a STARFlow2 training step, for `megaflow profile --parts`.

Each part runs alone, forward + backward, with the step's shapes and dtypes and the model's own
modules (so compiled or checkpointed blocks run as they do in the step), timed on the GPU with
CUDA events (perf_counter on CPU), median of a few repeats after one untimed run. A part's backward
starts from fixed random gradients of its outputs (`torch.autograd.backward(outputs, grads)`), so
no stand-in loss (a square and mean over the outputs in fp32) is timed with it:
  VLM stream     every VLM decoder layer, on (B, T, Dv) hidden states
  deep flow      every flow-stream layer, on (B, T, Df)
  shallow flows  the shallow TarFlow blocks, on the batch's images (B*M, N, D)
  heads+losses   final norms, LM head + cross-entropy, Gaussian head + flow NLL (`loss_terms`)
  skips          the Pretzel skips W_vlm and W_d of every unit
Under train.compile_scope=unit the blocks are compiled only inside their unit, so measured alone
they run eager: take parts from a compile_scope=block variant (tools/device/fast_step.sh does).
The rest of the step (embeddings, clipping, the optimizer, launch gaps) is the step time minus
their sum. FLOPs per part follow megaflow.monitor.step_flops's rule (real tokens; attention over each
document piece), so the parts' FLOPs add up to the step's (less the embeddings' adapter and flow_in
matmuls, counted in the rest), packed batches with padding included.
"""
from __future__ import annotations

import statistics
import time

import torch

from megaflow.monitor import piece_lengths


def _timer(device):
    if device.type == "cuda":
        def run(fn) -> float:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            return a.elapsed_time(b) / 1e3
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _n2d(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)


def measure_parts(model, batch: dict, dtype, device, peak: float, step_time: float, repeats: int = 3) -> dict:
    cfg, units = model.cfg, list(model.units.values())
    v, f = cfg.vlm, cfg.flow
    B, T = batch["tokens"].shape
    # real tokens and, for attention, the sum of L^2 over document pieces: monitor.step_flops's rule
    lengths = piece_lengths(batch["doc_ids"]).double() if "doc_ids" in batch else torch.full((B,), float(T))
    tokens, pairs = float(lengths.sum()), float(lengths.pow(2).sum())
    act = model.flow_in.weight.dtype
    n_img_tokens = int(batch["image_mask"].sum())
    gen = torch.Generator(device=device).manual_seed(0)
    timer = _timer(device)

    def rand(*shape, dt=act, grad=True):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt).requires_grad_(grad)

    with torch.no_grad():
        ctx = model.context(batch)
    parts = {}

    def part(name: str, flops: float, fn):
        grads = []

        def once():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = fn()
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o.requires_grad]
            if not grads:  # made in the untimed run
                grads.extend(torch.randn(o.shape, generator=gen, device=device, dtype=o.dtype) for o in outs)
            torch.autograd.backward(outs, grads)
        once()
        t = statistics.median(timer(once) for _ in range(repeats))
        parts[name] = {"time_s": t, "flops": flops, "mfu": flops / t / peak if peak else None}

    def stream(layers, h0, attn_ctx):
        def run():
            h = h0
            for layer in layers:
                h = layer(h, attn_ctx)
            return h
        return run

    vlm_layers = [layer for u in units for layer in u.vlm_layers]
    if vlm_layers:
        part("VLM stream", 6.0 * _n2d(vlm_layers) * tokens + 12.0 * v.n_layers * v.n_heads * v.hd * pairs,
             stream(vlm_layers, rand(B, T, v.dim), ctx.vlm))
    flow_layers = [u.flow_layer for u in units]
    part("deep flow", 6.0 * _n2d(flow_layers) * tokens + 12.0 * f.n_layers * f.dim * pairs,
         stream(flow_layers, rand(B, T, f.dim), ctx.flow))
    if f.n_shallow and n_img_tokens:
        M = int(batch["image_valid"].sum())
        lat = rand(M, cfg.fae.n_tokens, cfg.fae.latent_dim, dt=torch.float32, grad=False)

        def shallow():
            return model.shallow(lat)  # y, logdet, sq
        N = cfg.fae.n_tokens
        part("shallow flows", 6.0 * _n2d([model.shallow]) * n_img_tokens
             + 12.0 * N * f.n_shallow * f.shallow_layers * f.shallow_dim * n_img_tokens, shallow)
    heads = [m for m in (model.lm_head, model.gauss_head) if m is not None]
    state = (rand(B, T, v.dim if v is not None else 0), rand(B, T, f.dim),
             rand(B, T, cfg.fae.latent_dim, dt=torch.float32), rand(B, 2, dt=torch.float32))

    def losses():
        terms = model.loss_terms(state, batch)
        return model.combine(terms, model.loss_counts(batch))
    part("heads+losses", 6.0 * _n2d(heads) * tokens, losses)
    skips = [s for u in units for s in (u.w_vlm, u.w_d) if s is not None]
    if skips:
        hv, hf2 = rand(B, T, v.dim), rand(B, T, f.dim)

        def skip():
            out = []
            for u in units:
                if u.w_vlm is not None:
                    out.append(hf2 + ctx.vlm_skip * u.w_vlm(hv))  # (B, T, Df), as in PretzelUnit.forward
                if u.w_d is not None:
                    out.append(hv + ctx.image_mask * u.w_d(hf2))  # (B, T, Dv)
            return out
        part("skips", 6.0 * _n2d(skips) * tokens, skip)
    model.zero_grad(set_to_none=True)
    rest = step_time - sum(p["time_s"] for p in parts.values())
    return {"parts": parts, "step_time_s": step_time, "rest_s": rest}


def render_parts(p: dict) -> str:
    lines = [f"  {'part (fwd+bwd alone)':22s} {'ms':>8s} {'% step':>7s} {'TFLOP':>8s} {'MFU %':>6s}"]
    for name, r in p["parts"].items():
        mfu = f"{100 * r['mfu']:6.1f}" if r["mfu"] is not None else "   n/a"
        lines.append(f"  {name:22s} {r['time_s'] * 1e3:8.2f} {100 * r['time_s'] / p['step_time_s']:7.1f} "
                     f"{r['flops'] / 1e12:8.3f} {mfu}")
    lines.append(f"  {'rest (embed, optimizer)':22s} {p['rest_s'] * 1e3:8.2f} {100 * p['rest_s'] / p['step_time_s']:7.1f}")
    return "\n".join(lines)
