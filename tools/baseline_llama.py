"""The anchor of every MFU figure `megaflow profile --baseline` prints: a plain-PyTorch Llama decoder
of a given width and depth, trained the way a user who wrote it by hand would (what they would pick
instead of megaflow): bf16 weights, fused QKV and gate/up projections, SDPA (flash) causal attention,
F.rms_norm, fused AdamW directly on the bf16 weights, each block torch.compile'd, no padding.

It counts FLOPs by megaflow's rule (megaflow.monitor.step_flops): 6 x matmul multiply-adds per
token (every 2-D weight but the token embedding) + 6 x 2 x T x (heads x head_dim) per token per
layer for attention, causal masking not discounted. Times: the median synced step and the
back-to-back time of as many steps (one wait at the end), as `megaflow profile` reports its own. Not a library: one file, no options beyond
the shape.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int):
        super().__init__()
        self.hd, self.nh, self.nkv, self.ffn = dim // n_heads, n_heads, n_kv_heads, ffn_dim
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.hd, bias=False)
        self.o = nn.Linear(n_heads * self.hd, dim, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(dim))
        self.gate_up = nn.Linear(dim, 2 * ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = F.rms_norm(x, (D,), self.attn_norm, 1e-5)
        q, k, v = self.qkv(h).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(F.rms_norm(x, (D,), self.mlp_norm, 1e-5)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Llama(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads, n_kv_heads, ffn_dim) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        hd = self.blocks[0].hd
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=tokens.device, dtype=torch.float32) / hd))
        f = torch.arange(T, device=tokens.device, dtype=torch.float32)[:, None] * inv
        emb = torch.cat([f, f], dim=-1)
        cos, sin = emb.cos().to(self.norm.dtype), emb.sin().to(self.norm.dtype)  # (T, hd)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def flops_per_step(self, B: int, T: int) -> float:
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
        b = self.blocks[0]
        return 6.0 * matmul * B * T + 6.0 * 2 * T * len(self.blocks) * b.nh * b.hd * B * T


def run_baseline(vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                 rows: int, seq_len: int, device: torch.device, steps: int = 10, warmup: int = 3,
                 compile: bool = True, peak_flops: float = 0.0) -> dict:
    """Train the baseline for warmup + steps steps on random tokens; step time, MFU, peak memory."""
    torch.manual_seed(0)
    model = Llama(vocab, dim, n_layers, n_heads, n_kv_heads, ffn_dim).to(device=device, dtype=torch.bfloat16)
    if compile:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda")
    tokens = torch.randint(0, vocab, (rows, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    t0 = time.perf_counter()  # back to back, one wait at the end (as megaflow profile's loop figure)
    for _ in range(steps):
        loss = step()
    sync()
    loop = (time.perf_counter() - t0) / steps
    flops = model.flops_per_step(rows, seq_len)
    out = {"name": "plain-PyTorch Llama (bf16 weights, fused QKV/gate-up, SDPA, fused AdamW"
                   + (", compiled blocks)" if compile else ", eager)"),
           "params": sum(p.numel() for p in model.parameters()), "dim": dim, "n_layers": n_layers,
           "n_heads": n_heads, "n_kv_heads": n_kv_heads, "ffn_dim": ffn_dim, "vocab": vocab, "rows": rows,
           "seq_len": seq_len, "step_time_s": med, "tokens_per_s": rows * seq_len / med,
           "model_tflops": flops / med / 1e12, "mfu": flops / med / peak_flops if peak_flops else None,
           "loop_step_time_s": loop, "loop_mfu": flops / loop / peak_flops if peak_flops else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "last_loss": float(loss.detach())}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
