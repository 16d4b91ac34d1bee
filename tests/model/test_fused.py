"""Fused projections (one QKV GEMM, one gate/up GEMM) compute the separate projections' math, and
state dicts written before the fusion (q_proj/k_proj/v_proj, gate_proj/up_proj) still load.

Contract:
- a transformer block with grouped-query attention and q/k/v biases gives, on the same weights, what
  the old separate-projection code computed (q, k, v and gate, up as separate Linears, RoPE on q
  and k separately), within fp32 rounding;
- a whole STARFlow2's state dict in the old layout (both streams and the shallow blocks) loads with
  `load_state_dict(strict=True)` into a fresh model and reproduces every tensor exactly;
- an old state dict missing one part is refused by the strict load, naming the part.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megaflow.model.layers import AttnContext, TransformerBlock, apply_rope, fuse_legacy, legacy_parts, rope_tables
from megaflow.model.masks import attend
from megaflow.model.starflow import build_model
from parallel.fused import fused_layout
from tests.helpers import tiny_config


def separate_block(block: TransformerBlock, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """The block as the code before the fusion computed it, on slices of the fused weights."""
    attn, mlp = block.self_attn, block.mlp
    B, T, _ = x.shape
    hd = attn.head_dim
    h = block.input_layernorm(x)
    ws, bs = attn.qkv.weight.split(attn.qkv_sizes()), attn.qkv.bias.split(attn.qkv_sizes())
    q, k, v = (F.linear(h, w, b).view(B, T, -1, hd).transpose(1, 2) for w, b in zip(ws, bs))  # (B, H, T, hd)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    y = attend(q, k, v, None).transpose(1, 2).reshape(B, T, -1)  # (B, T, Hq*hd)
    x = x + attn.o_proj(y)
    gate_w, up_w = mlp.gate_up.weight.chunk(2)
    h = block.post_attention_layernorm(x)
    return x + mlp.down_proj(F.silu(F.linear(h, gate_w)) * F.linear(h, up_w))


def test_fused_block_equals_separate_projections():
    torch.manual_seed(0)
    block = TransformerBlock(dim=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, qkv_bias=True)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(2, 10, 32)
    cos, sin = rope_tables(torch.arange(10)[None].expand(2, 10), 8, 10000.0)
    ctx = AttnContext(cos, sin)
    assert block.self_attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32) and block.mlp.gate_up.weight.shape == (96, 32)
    got, want = block(x, ctx), separate_block(block, x, ctx)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())


def to_legacy(model) -> dict:
    """The model's state dict as the code before the fusion named and shaped it."""
    state, layout = model.state_dict(), fused_layout(model)
    out = {}
    for name, t in state.items():
        if name in layout:
            out.update(zip(legacy_parts(name), t.split([rows for rows, _ in layout[name]])))
        else:
            out[name] = t
    return out


def test_old_layout_state_dict_loads_into_the_fused_model():
    cfg = replace(tiny_config(), stage="all")
    old = to_legacy(build_model(cfg, seed=0))
    new = build_model(cfg, seed=1)
    assert "units.0.vlm_layers.0.self_attn.k_proj.weight" in old and "shallow.blocks.0.layers.0.mlp.up_proj.weight" in old
    want = fuse_legacy(dict(old))
    assert not any(".q_proj." in k or ".gate_proj." in k for k in want)
    new.load_state_dict(dict(old), strict=True)
    for name, t in new.state_dict().items():
        assert torch.equal(t, want[name]), name
    assert torch.equal(new.state_dict()["units.0.flow_layer.self_attn.qkv.weight"][:32],
                       old["units.0.flow_layer.self_attn.q_proj.weight"])

    broken = dict(old)
    del broken["units.1.vlm_layers.0.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match="units.1.vlm_layers.0.mlp.gate_up.weight"):
        new.load_state_dict(broken, strict=True)
