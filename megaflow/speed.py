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
  train.compile  auto (on with CUDA) | on | off: regional torch.compile, one graph per distinct
                 region shape, compiled once and reused by every region of that shape
  train.compile_scope  what one region is:
      block  each transformer block, and the small ops around them: each shallow flow block's
             affine map (its final norm, head, Gaussian parameters, z and log-det) and the heads +
             losses (as in unit scope); eager, those ran as separate fp32 kernels
      unit   each Pretzel unit (its r VLM blocks, the skips W_vlm / W_d, its flow block), each
             shallow flow block's coupling (proj_in, its blocks, the head, the affine map and the
             log-det) and the heads + losses (final norms, LM head, cross-entropy, Gaussian head,
             the flow NLL: `STARFlow2.loss_terms`; only with the plain heads, not TP's vocab-parallel
             ones): the skips', couplings' and losses' small ops fuse into the graphs and the host
             launches a few graphs instead of hundreds of small kernels (the shallow flows at width
             256 are launch-bound); a block inside a unit keeps its own checkpointing
  train.compile_mode  torch.compile's mode: default | tuned | max-autotune-no-cudagraphs | reduce-overhead;
             `tuned` is default plus inductor's coordinate-descent tuning of its own kernels' launch
             parameters (block sizes, warps), benchmarked once at compile time (no GEMM autotuning)

Not here: mixed precision (megaflow/optim.py MainWeights), the engines that call these.
"""
from __future__ import annotations

import logging
import types
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megaflow.model.flow import ShallowFlowBlock
from megaflow.model.layers import TransformerBlock
from megaflow.model.starflow import PretzelUnit, STARFlow2, TextLoss

AC_MODES = ("none", "selective", "full")
COMPILE_MODES = ("auto", "on", "off")
COMPILE_SCOPES = ("block", "unit")
BACKEND = "inductor"  # what apply_speedups compiles with (CPU tests set "aot_eager": inductor's C++ build is slow there)
TORCH_COMPILE_MODES = ("default", "tuned", "max-autotune-no-cudagraphs", "reduce-overhead")
MODE_OPTIONS = {"tuned": {"coordinate_descent_tuning": True}}  # modes that are inductor options, not torch modes

_aten = torch.ops.aten
_SAVE = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.linear.default,
         _aten._scaled_mm.default,  # FP8 linears (megaflow/fp8.py)
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
    if getattr(block, "ac_checkpoint", None) is not None:  # FP8: TE's checkpoint (parallel/backend.fp8_forward)
        return block.ac_checkpoint(TransformerBlock.forward, block, x, ctx)
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _save_matmuls)} if mode == "selective" else {}
    return checkpoint(TransformerBlock.forward, block, x, ctx, use_reentrant=False, **kwargs)


def unit_forward(unit: PretzelUnit, state: tuple, ctx) -> tuple:
    """One Pretzel unit's training forward (its blocks under their `ac_mode`), shared by every unit."""
    return PretzelUnit.forward(unit, state, ctx)


def coupling_forward(block: ShallowFlowBlock, xo: torch.Tensor, rope: tuple) -> tuple:
    """One shallow flow block's coupling on block-ordered tokens, shared by every shallow block."""
    return ShallowFlowBlock.coupling(block, xo, rope)


def affine_forward(block: ShallowFlowBlock, h: torch.Tensor, xo: torch.Tensor) -> tuple:
    """One shallow flow block's affine map from its last layer's output, shared by every shallow block."""
    return ShallowFlowBlock.affine(block, h, xo)


def loss_forward(model: STARFlow2, state: tuple, batch: dict) -> dict:
    """The heads and summed losses of the last units' state (STARFlow2.loss_terms)."""
    return STARFlow2.loss_terms(model, state, batch)


def plain_heads(model: STARFlow2) -> bool:
    """The model's own heads and loss (not tensor parallelism's vocab-parallel swaps, whose
    collectives stay outside compiled regions here)."""
    return type(model.text_loss) is TextLoss and type(model.lm_head) in (nn.Linear, type(None)) \
        and type(model.gauss_head) is nn.Linear and isinstance(model.seq_split, nn.Identity)


_compiled = {}  # (function name, backend, mode) -> its torch.compile'd version


def _compiled_fn(fn, backend: str, mode: str):
    key = (fn.__name__, backend, mode)
    if key not in _compiled:
        # static shapes: a run's shapes are fixed (rows x seq_len, images x tokens), so each region shape
        # gets its own specialised graph; a dynamic-T graph (shared by TarFlow's 1,024-token shallow and
        # 1,040-token deep blocks) failed an output-stride assertion on the H200 with the fused QKV
        how = {"options": MODE_OPTIONS[mode]} if mode in MODE_OPTIONS and backend == "inductor" else \
            {"mode": None if mode in ("default", *MODE_OPTIONS) else mode}
        _compiled[key] = torch.compile(fn, backend=backend, dynamic=False, **how)
    return _compiled[key]


def _block_forward(self: TransformerBlock, x: torch.Tensor, ctx) -> torch.Tensor:
    """A wrapped block's forward (bound to it): training -> block_forward (compiled when
    `self.compiled`), the rest (no grad, KV cache) -> the plain eager forward. One function for
    every block, so a compiled unit that calls its blocks does not specialise on each of them."""
    if not _training(ctx):
        return TransformerBlock.forward(self, x, ctx)
    if self.compiled is not None:
        return self.compiled(self, x, ctx)
    return block_forward(self, x, ctx)


def _unit_forward(self: PretzelUnit, state: tuple, ctx) -> tuple:
    if not _training(ctx.flow):
        return PretzelUnit.forward(self, state, ctx)
    return self.compiled(self, state, ctx)


def _coupling(self: ShallowFlowBlock, xo: torch.Tensor, rope=None) -> tuple:
    if not torch.is_grad_enabled():
        return ShallowFlowBlock.coupling(self, xo, rope)
    if not xo.requires_grad:  # the first block's input (the FAE latent): one graph for every block (its
        xo = xo.detach().requires_grad_()  # gradient, one small matmul, is computed and dropped)
    if rope is None:  # the tables are the graph's inputs, made eagerly (ShallowFlowBlock.coupling says why)
        rope = self.rope(xo.shape[1], xo)
    return self.compiled_coupling(self, xo, rope)


def _affine(self: ShallowFlowBlock, h: torch.Tensor, xo: torch.Tensor) -> tuple:
    if not torch.is_grad_enabled():
        return ShallowFlowBlock.affine(self, h, xo)
    if not xo.requires_grad:  # the first block's input, as in _coupling: one graph for every block
        xo = xo.detach().requires_grad_()
    return self.compiled_affine(self, h, xo)


def _loss_terms(self: STARFlow2, state: tuple, batch: dict) -> dict:
    if not torch.is_grad_enabled():
        return STARFlow2.loss_terms(self, state, batch)
    return self.compiled_loss(self, state, batch)


def _wrap(block: TransformerBlock) -> None:
    if not hasattr(block, "compiled"):
        block.compiled = None
    block.forward = types.MethodType(_block_forward, block)


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


def check_compile_settings(scope: str, mode: str) -> None:
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"train.compile_scope={scope!r} must be one of {COMPILE_SCOPES}")
    if mode not in TORCH_COMPILE_MODES:
        raise ValueError(f"train.compile_mode={mode!r} must be one of {TORCH_COMPILE_MODES}")


def apply_compile(model: nn.Module, backend: str = "inductor", scope: str = "block", mode: str = "default") -> int:
    """torch.compile the training forward of each region of `scope` (blocks keep their activation
    checkpointing inside); returns how many regions. Every region of a kind shares one compiled
    function; dynamo compiles it once per shape and checkpointing mode (the limit on cached graphs is
    raised to allow a few of those). In "unit" scope, blocks outside any unit are compiled alone; in
    "block" scope the shallow blocks' affine maps and the heads + losses are regions too."""
    check_compile_settings(scope, mode)
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    regions, inside = 0, set()
    for m in model.modules():
        if scope == "unit" and isinstance(m, PretzelUnit):
            m.compiled = _compiled_fn(unit_forward, backend, mode)
            m.forward = types.MethodType(_unit_forward, m)
            inside.update(id(b) for b in transformer_blocks(m))
        elif scope == "unit" and isinstance(m, ShallowFlowBlock):
            m.compiled_coupling = _compiled_fn(coupling_forward, backend, mode)
            m.coupling = types.MethodType(_coupling, m)
            inside.update(id(b) for b in transformer_blocks(m))
        elif isinstance(m, ShallowFlowBlock):  # block scope: its blocks are regions below, its affine map one more
            m.compiled_affine = _compiled_fn(affine_forward, backend, mode)
            m.affine = types.MethodType(_affine, m)
        elif isinstance(m, STARFlow2) and plain_heads(m):  # the heads + losses (no block inside)
            m.compiled_loss = _compiled_fn(loss_forward, backend, mode)
            m.loss_terms = types.MethodType(_loss_terms, m)
        else:
            continue
        regions += 1
    for block in transformer_blocks(model):
        _wrap(block)
        if id(block) not in inside:
            block.compiled = _compiled_fn(block_forward, backend, mode)
            regions += 1
    return regions


def apply_speedups(model: nn.Module, tcfg, device: torch.device) -> dict:
    """Activation checkpointing, then compilation, as the run's config says (`train`); the compile
    settings are checked on every device (a typo fails on the CPU too, not first on the GPU)."""
    check_compile_settings(tcfg.compile_scope, tcfg.compile_mode)
    n_ac = apply_ac(model, tcfg.activation_checkpointing)
    n_compiled = apply_compile(model, BACKEND, tcfg.compile_scope, tcfg.compile_mode) \
        if compile_enabled(tcfg.compile, device) else 0
    if n_compiled and tcfg.compile_mode in MODE_OPTIONS:
        logging.getLogger("megaflow").info(
            "train.compile_mode=%s: inductor tunes each generated kernel at the first compile (minutes: ~6 on h200_1b's "
            "H200 step; inductor's cache keeps the results for the next run)", tcfg.compile_mode)
    return {"checkpointed_blocks": n_ac, "compiled_regions": n_compiled}
