"""Speed-ups applied to a built model from outside (torchtitan's `apply_ac` / `apply_compile`):
activation checkpointing and regional torch.compile, both per transformer block (the VLM stream's,
the deep flow's and the shallow flows' layers), so names, state dicts, tensor-parallel swaps and
pipeline splits are untouched: a block keeps its modules and only its `forward` is wrapped.

Both wrappers act in training only (grad enabled, no KV cache): evaluation and token-by-token
generation run the plain eager forward, so decoding never recompiles per length.

  train.activation_checkpointing  none | selective | full
      full       a block keeps only its input; its whole forward is recomputed in backward
      selective  a block keeps the outputs of its matmuls and of attention and recomputes the
                 cheap rest (norms, RoPE, SiLU x up, residual adds): most of full's memory saving
                 on activations that are elementwise, at little recompute
  train.compile  auto (on with CUDA) | on | off: torch.compile of each block (regional: one graph
                 per distinct block shape, compiled once and reused by every layer of that shape)

Not here: mixed precision (megaflow/optim.py MainWeights), the engines that call these.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megaflow.model.layers import TransformerBlock

AC_MODES = ("none", "selective", "full")
COMPILE_MODES = ("auto", "on", "off")

_aten = torch.ops.aten
_SAVE = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
         _aten._scaled_dot_product_flash_attention.default,
         _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default}


def transformer_blocks(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def _training(ctx) -> bool:
    return torch.is_grad_enabled() and getattr(ctx, "cache", None) is None


def _save_matmuls(ctx, func, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if func in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def block_forward(block: TransformerBlock, x: torch.Tensor, ctx) -> torch.Tensor:
    """One block's training forward under its `ac_mode`. A module-level function of the block, so
    one compiled graph per block shape serves every layer (the block is an input, not a constant)."""
    mode = getattr(block, "ac_mode", "none")
    if mode == "none":
        return TransformerBlock.forward(block, x, ctx)
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _save_matmuls)} if mode == "selective" else {}
    return checkpoint(TransformerBlock.forward, block, x, ctx, use_reentrant=False, **kwargs)


_compiled = {}


def _wrap(block: TransformerBlock) -> None:
    """Route the block's calls: training -> block_forward (compiled when `block.compiled`), the
    rest (no grad, KV cache) -> the plain eager forward."""
    def forward(x, ctx, _block=block):
        if not _training(ctx):
            return TransformerBlock.forward(_block, x, ctx)
        if getattr(_block, "compiled", ""):
            return _compiled[_block.compiled](_block, x, ctx)
        return block_forward(_block, x, ctx)
    block.forward = forward


def apply_ac(model: nn.Module, mode: str) -> int:
    """Activation checkpointing of every transformer block (in training); returns how many."""
    if mode not in AC_MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r} must be one of {AC_MODES}")
    if mode == "none":
        return 0
    blocks = transformer_blocks(model)
    for block in blocks:
        block.ac_mode = mode
        _wrap(block)
    return len(blocks)


def compile_enabled(mode: str, device: torch.device) -> bool:
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile={mode!r} must be one of {COMPILE_MODES}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each transformer block's training forward (with its activation checkpointing);
    returns how many. Every block shares one compiled function; dynamo compiles it once per block
    shape and checkpointing mode (the limit on cached graphs is raised to allow a few of those)."""
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if backend not in _compiled:
        _compiled[backend] = torch.compile(block_forward, backend=backend)
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compiled = backend
        _wrap(block)
    return len(blocks)


def apply_speedups(model: nn.Module, tcfg, device: torch.device) -> dict:
    """Activation checkpointing, then compilation, as the run's config says (`train`)."""
    n_ac = apply_ac(model, tcfg.activation_checkpointing)
    n_compiled = apply_compile(model) if compile_enabled(tcfg.compile, device) else 0
    return {"checkpointed_blocks": n_ac, "compiled_blocks": n_compiled}
