"""Transformer building blocks shared by the VLM stream, the deep flow stream and the shallow flows.

Llama/Qwen2 style: RMSNorm, rotary position embeddings (rope.py), grouped-query attention (optional q/k/v
bias), SwiGLU. The projections are fused: one QKV GEMM (`self_attn.qkv`, rows [q; k; v]) and one
gate/up GEMM (`mlp.gate_up`, rows [gate; up]). Other leaf names follow Hugging Face
(`self_attn.o_proj`, `mlp.down_proj`, `input_layernorm`, ...); the HF names of the fused parts
(`FUSED`: q_proj/k_proj/v_proj, gate_proj/up_proj) live only at the import/export boundary
(megaflow/hf_import.py) and in old checkpoints, which `fuse_legacy` turns into the fused names on
load (a load_state_dict pre-hook on each module does it for `model.load_state_dict`).

Head counts are attributes (`Attention.n_heads`, `n_kv_heads`) that tensor parallelism sets to the
local counts when it swaps `qkv` for a sharded one from outside (parallel/tensor_parallel.py); the
block then works unchanged. No rank logic lives here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.add_norm import add_rms_norm
from megaflow.model.masks import attend
from megaflow.model.rope import apply_rope, qkv_rope, rope_tables  # noqa: F401 (rope_tables: re-exported)
from megaflow.model.swiglu import silu_mul

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


# On CUDA: RoPE + the QKV gradient (rope.py) and the post-attention add + RMSNorm (add_norm.py) as
# Triton kernels with one-pass backwards; False runs the torch ops inductor fuses (for comparisons:
# tools/device/tarflow_block.py --kernels none,rope,rope+add_norm). add_norm is opt-in: at TarFlow's
# shape it saved 0.056 ms of kernel time a layer but only 0.010 ms replayed from a CUDA graph, and its
# host work cost 0.155 ms a layer when launched (docs/benchmarks.md, "TarFlow ... round 2").
CUDA_KERNELS = {"rope": True, "add_norm": False}

# fused parameter's module name -> the (Hugging Face) names of its parts, in row order
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def fuse_legacy(state: dict, prefix: str = "") -> dict:
    """Old (separate-projection) entries of a state dict -> fused ones, in place; returns `state`.
    Every `{prefix}...q_proj.weight`, `k_proj.weight`, `v_proj.weight` (and biases; gate/up alike)
    become one `...qkv.weight` (rows concatenated). A set with a part missing is left as it is (the
    load then reports it). Values may be tensors or anything torch.cat takes."""
    for key in [k for k in state if k.startswith(prefix)]:
        mod, _, pname = key.rpartition(".")
        base, _, leaf = mod.rpartition(".")
        for fused, parts in FUSED.items():
            keys = [f"{base}.{p}.{pname}" if base else f"{p}.{pname}" for p in parts]
            if leaf == parts[0] and all(k in state for k in keys):
                state[f"{base}.{fused}.{pname}" if base else f"{fused}.{pname}"] = torch.cat([state.pop(k) for k in keys])
    return state


def legacy_parts(name: str) -> Optional[tuple]:
    """`...qkv.weight` -> (`...q_proj.weight`, `...k_proj.weight`, `...v_proj.weight`) (gate_up
    alike); None for a name that is not a fused parameter."""
    mod, _, pname = name.rpartition(".")
    base, _, leaf = mod.rpartition(".")
    if leaf not in FUSED:
        return None
    return tuple(f"{base}.{p}.{pname}" if base else f"{p}.{pname}" for p in FUSED[leaf])


def _fuse_legacy_hook(state_dict, prefix, *args):
    fuse_legacy(state_dict, prefix)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 like HF Llama, then cast back.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def init_weights(self):
        nn.init.ones_(self.weight)


@dataclass
class AttnContext:
    """What every attention layer of one stream needs besides its input.

    `mask` is a boolean (B, 1, Tq, Tk) allow-mask, an additive float mask (decoding), a
    FlexAttention BlockMask of the same rule (megaflow/model/masks.py), or None for plain causal
    attention without a cache.
    `cache` holds each layer's keys/values of earlier positions (megaflow/model/decoding.py):
    `cache.update(layer_key, k, v)` stores this forward's and returns all that `mask` covers.
    """
    cos: torch.Tensor
    sin: torch.Tensor
    mask: Optional[Union[torch.Tensor, "BlockMask"]] = None
    cache: Optional[dict] = None


class Attention(nn.Module):
    """Grouped-query attention with one fused QKV projection: `qkv` rows are [q (n_heads heads);
    k (n_kv_heads); v (n_kv_heads)], each head `head_dim` rows."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False):
        super().__init__()
        self.head_dim, self.n_heads, self.n_kv_heads = head_dim, n_heads, n_kv_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.cache_key = id(self)
        self._register_load_state_dict_pre_hook(_fuse_legacy_hook)  # old checkpoints: q/k/v_proj

    def qkv_sizes(self) -> tuple:
        """Rows of q, k and v in `qkv` (this module's, i.e. local under tensor parallelism)."""
        return tuple(h * self.head_dim for h in (self.n_heads, self.n_kv_heads, self.n_kv_heads))

    def fused_rows(self) -> dict:
        """{fused child: rows of each part} (checkpoint conversion reads it)."""
        return {"qkv": self.qkv_sizes()}

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        Hq, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x)  # (B, T, ...): T of the whole sequence also where x is a sequence-parallel slice
        B, T = qkv.shape[:2]  # that a layer gathering it itself (Transformer Engine's) made whole
        qkv = qkv.view(B, T, Hq + 2 * Hkv, self.head_dim)  # (B, T, Hq+2Hkv, hd)
        if qkv.is_cuda and ctx.cache is None and CUDA_KERNELS["rope"]:  # one Triton kernel each way (rope.py)
            q, k, v = qkv_rope(qkv, ctx.cos, ctx.sin, Hq, Hkv)  # (B, H, T, hd) each
        else:
            qkv = qkv.transpose(1, 2)  # (B, Hq+2Hkv, T, hd)
            q, k = apply_rope(qkv[:, :Hq + Hkv], ctx.cos, ctx.sin).split([Hq, Hkv], dim=1)  # RoPE on q and k at once
            v = qkv[:, Hq + Hkv:]  # (B, Hkv, T, hd)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.cache_key, k, v)  # (B, Hkv, Tk, hd): earlier positions and these
        y = attend(q, k, v, ctx.mask)  # (B, Hq, Tq, hd): plain causal, dense mask or FlexAttention (masks.py;
        # grouped heads: FlexAttention reads the Hkv heads in place, the other kernels get them repeated)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, Hq*hd)
        return self.o_proj(y)

    def init_weights(self, std: float, out_std: float):
        nn.init.normal_(self.qkv.weight, std=std)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.o_proj.weight, std=out_std)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with one fused gate/up projection: `gate_up` rows are [gate; up]."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self._register_load_state_dict_pre_hook(_fuse_legacy_hook)  # old checkpoints: gate/up_proj

    def fused_rows(self) -> dict:
        """{fused child: rows of each part} (checkpoint conversion reads it)."""
        return {"gate_up": (self.gate_up.out_features // 2,) * 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., 2 ffn) [gate; up] -> (..., ffn) silu(gate) * up; under TP this rank's halves. Its backward
        # is one pass writing the gate_up gradient (megaflow/model/swiglu.py)
        return self.down_proj(silu_mul(self.gate_up(x)))

    def init_weights(self, std: float, out_std: float):
        nn.init.normal_(self.gate_up.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)). Names as HF Llama."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int,
                 eps: float = 1e-5, qkv_bias: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads, head_dim, qkv_bias)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, ffn_dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), ctx)  # (B, T, dim)
        norm = self.post_attention_layernorm
        if x.is_cuda and CUDA_KERNELS["add_norm"] and type(norm) is RMSNorm:  # one-pass backward (add_norm.py)
            x, h = add_rms_norm(x, a, norm.weight, norm.eps)
        else:
            x = x + a
            h = norm(x)
        return x + self.mlp(h)

    def init_weights(self, std: float, out_std: float):
        self.input_layernorm.init_weights()
        self.post_attention_layernorm.init_weights()
        self.self_attn.init_weights(std, out_std)
        self.mlp.init_weights(std, out_std)


def attention_mask(doc_ids: Optional[torch.Tensor], q_len: int, k_len: int, device) -> Optional[torch.Tensor]:
    """Boolean allow-mask (B|1, 1, q_len, k_len): causal (queries are the LAST q_len of k_len
    positions), and within one packed document when `doc_ids` (B, k_len) is given.
    Returns None when plain causal attention without an offset suffices."""
    if doc_ids is None and q_len == k_len:
        return None
    qpos = torch.arange(k_len - q_len, k_len, device=device)
    kpos = torch.arange(k_len, device=device)
    allow = (kpos[None, :] <= qpos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if doc_ids is not None:
        # Padding (doc -1) attends to padding, so no row is ever fully masked.
        allow = allow & (doc_ids[:, None, -q_len:, None] == doc_ids[:, None, None, :])  # (B, 1, Tq, Tk)
    return allow
