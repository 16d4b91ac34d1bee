"""The anchor of every MFU figure `megaflow profile --baseline` prints: a plain-PyTorch Llama decoder
of a given width and depth, trained the way a user who wrote it by hand would (what they would pick
instead of megaflow): bf16 weights, fused QKV and gate/up projections, SDPA (flash) causal attention,
F.rms_norm, fused AdamW directly on the bf16 weights, each block torch.compile'd, no padding.

It counts FLOPs by megaflow's rule (megaflow.monitor.step_flops): 6 x matmul multiply-adds per
token (every 2-D weight but the token embedding) + 6 x 2 x T x (heads x head_dim) per token per
layer for attention, causal masking not discounted. Times: the median synced step and the
back-to-back time of as many steps (one wait at the end), as `megaflow profile` reports its own. Not a library: one file, no options beyond
the shape.

Packed rows (`doc_ids`, `megaflow profile --real-data --baseline`): the same Llama over rows packed with
documents as the data pipeline packs them, written as a plain-PyTorch user would: each token attends to
earlier tokens of its own document (FlexAttention with torch's default 128-token BlockMask on CUDA, a dense
mask with SDPA on CPU), RoPE positions restart at each document, no target on padding; FLOPs count real
tokens and each document's own attention (12 x layers x heads x head_dim x sum of L^2), megaflow's rule.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional

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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        B, T, D = x.shape
        h = F.rms_norm(x, (D,), self.attn_norm, 1e-5)
        q, k, v = self.qkv(h).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        gqa = self.nkv != self.nh
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(mask, torch.Tensor):  # (B, 1, T, T) bool: documents on CPU
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # a BlockMask: documents on CUDA
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
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

    def hidden(self, tokens: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, dim) after the final norm; doc_ids (B, T): packed documents (see the module's docstring)."""
        B, T = tokens.shape
        hd = self.blocks[0].hd
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=tokens.device, dtype=torch.float32) / hd))
        pos = torch.arange(T, device=tokens.device) if doc_ids is None else doc_positions(doc_ids)  # (T,) | (B, T)
        f = pos.float()[..., None] * inv
        emb = torch.cat([f, f], dim=-1)
        cos, sin = emb.cos().to(self.norm.dtype), emb.sin().to(self.norm.dtype)  # (T, hd) | (B, T, hd)
        if doc_ids is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        mask = None if doc_ids is None else document_mask(doc_ids)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.lm_head(self.hidden(tokens, doc_ids))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # -100: no target

    def flops_per_step(self, B: int, T: int, doc_ids: Optional[torch.Tensor] = None) -> float:
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
        b = self.blocks[0]
        if doc_ids is None:
            return 6.0 * matmul * B * T + 6.0 * 2 * T * len(self.blocks) * b.nh * b.hd * B * T
        from megaflow.monitor import piece_lengths  # the documents' lengths as megaflow's own rule counts them
        real = int((doc_ids >= 0).sum())
        squares = float((piece_lengths(doc_ids).double() ** 2).sum())
        return 6.0 * matmul * real + 6.0 * 2 * len(self.blocks) * b.nh * b.hd * squares


def doc_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's position within its run of equal doc ids (0 at a document's first token)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values


def document_mask(doc_ids: torch.Tensor):
    """Causal within each document: torch's default BlockMask on CUDA, a dense (B, 1, T, T) bool mask elsewhere."""
    B, T = doc_ids.shape
    if doc_ids.is_cuda:
        from torch.nn.attention.flex_attention import create_block_mask
        return create_block_mask(lambda b, h, q, k: (k <= q) & (doc_ids[b, q] == doc_ids[b, k]), B, None, T, T,
                                 device=doc_ids.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def run_baseline(vocab: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                 rows: int, seq_len: int, device: torch.device, steps: int = 10, warmup: int = 3,
                 compile: bool = True, peak_flops: float = 0.0, doc_ids: Optional[list] = None) -> dict:
    """Train the baseline for warmup + steps steps on random tokens; step time, MFU, peak memory. `doc_ids`: a list
    of (rows, seq_len) doc-id tensors, the packed rows' layouts the steps take in turn (each step builds its mask,
    as a user's loop would); the MFU then counts their real tokens and documents (median over the steps)."""
    torch.manual_seed(0)
    model = Llama(vocab, dim, n_layers, n_heads, n_kv_heads, ffn_dim).to(device=device, dtype=torch.bfloat16)
    if compile:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda")
    tokens = torch.randint(0, vocab, (rows, seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    layouts = [d.to(device) for d in doc_ids] if doc_ids else [None]
    targets = [y if d is None else y.masked_fill(d < 0, -100) for d in layouts]  # no target on padding
    turn = [0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        i = turn[0] % len(layouts)
        turn[0] += 1
        loss = model(x, targets[i], layouts[i])
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
    flops = statistics.median(model.flops_per_step(rows, seq_len, d) for d in layouts)
    attention = "SDPA" if doc_ids is None else "document masks (" + (
        "FlexAttention, torch's 128-token blocks)" if device.type == "cuda" else "a dense mask)")
    out = {"name": f"plain-PyTorch Llama (bf16 weights, fused QKV/gate-up, {attention}, fused AdamW"
                   + (", compiled blocks)" if compile else ", eager)") + ("" if doc_ids is None else " on the packed rows"),
           "packed": doc_ids is not None,
           "params": sum(p.numel() for p in model.parameters()), "dim": dim, "n_layers": n_layers,
           "n_heads": n_heads, "n_kv_heads": n_kv_heads, "ffn_dim": ffn_dim, "vocab": vocab, "rows": rows,
           "seq_len": seq_len, "step_time_s": med,
           "tokens_per_s": statistics.median(int((d >= 0).sum()) if d is not None else rows * seq_len
                                             for d in layouts) / med,
           "model_tflops": flops / med / 1e12, "mfu": flops / med / peak_flops if peak_flops else None,
           "loop_step_time_s": loop, "loop_mfu": flops / loop / peak_flops if peak_flops else None,
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "last_loss": float(loss.detach())}
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
