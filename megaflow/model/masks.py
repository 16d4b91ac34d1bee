"""Attention masks of packed batches, built once per batch and shared by every attention layer.

A packed row holds several documents; a token may attend to earlier tokens of its own document
only (causal AND same doc_id; padding, doc_id -1, attends to padding so no row is fully masked).
Two exact implementations of that one rule:
  - FlexAttention (`torch.nn.attention.flex_attention`, compiled) with a `BlockMask` made by
    `create_block_mask`: blocks that are entirely masked (across documents, above the diagonal)
    are skipped, so the cost follows the documents' lengths instead of T^2. Used on CUDA.
  - the dense boolean (B, 1, Tq, Tk) mask of `layers.attention_mask` with SDPA: exact everywhere,
    used on CPU (FlexAttention has no CPU backward in torch 2.13) and with a KV cache (generation).
`document_mask` picks one for the device; `attend` runs whichever it is given (None = plain causal,
e.g. the shallow flows, whose sequences are single images); bf16 on CPU under a dense or no mask
runs `explicit_attention` (matmuls and an fp32 softmax) instead of SDPA's slower CPU kernel.
Both streams and all their layers receive the same object through `AttnContext.mask`
(starflow.py `context`).

Mask blocks (`model.mask_block`): 64 tokens (the default) or 128 (torch's). Smaller blocks skip more of
the work across documents (~112-token documents: a 128-token block is often half another document's; on
h200_1b's real rows 64 computes 37% fewer (q, k) pairs) but need kernel tiles that divide them:
`FLEX_TILES` gives the forward and backward tiles as flex's `kernel_options`, and `_divisible_bwd_tile`
lets the backward lowering keep a configuration it would otherwise drop (it drops every default tile that
does not divide the blocks before the options apply). The tiles decide it: with 64 x 64 backward tiles
(22% slower a block than the default's) 64-token blocks gained ~1 ms a step; with (32, 64, 64, 32), the
tile inductor's own autotuning picks and as fast a block as the default's, the h200_1b real-data step
went 169.9 -> 166.7 ms back to back (docs/benchmarks.md, "The fast step, round 10").

No rank logic here; sequence-parallel layouts see the full T inside attention.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn.functional as F

try:  # FlexAttention is in torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense path only
    BlockMask = create_block_mask = create_mask = flex_attention = None

FLEX_MIN_HEAD_DIM = 16  # FlexAttention's compiled kernels refuse smaller heads (seen on the H200)

Mask = Union[None, torch.Tensor, "BlockMask"]

_KERNEL = "auto"  # "auto": flex on CUDA, dense elsewhere; "flex" / "dense" force one (tests, benchmarks)
# Made once here (compiling happens at the first call), never inside a function: a `torch.compile(...)`
# met while dynamo traces a compiled block becomes the plain function, and the assignment of it to a
# global is replayed, so a lazily made wrapper turned into eager flex_attention after the first
# compiled forward: every eager call after that (evaluation, compile-off rows of a benchmark) ran
# FlexAttention's slow reference path (1.5 s TP=2 steps on the H200, docs/benchmarks.md issue 17).
_compiled_flex = torch.compile(flex_attention, dynamic=False) if flex_attention is not None else None


@contextlib.contextmanager
def use_kernel(kernel: str):
    """Force the document-mask kernel ("flex", "dense" or "auto") inside the block."""
    global _KERNEL
    if kernel not in ("auto", "flex", "dense"):
        raise ValueError(f"kernel={kernel!r}; use 'auto', 'flex' or 'dense'")
    if kernel == "flex" and flex_attention is None:
        raise RuntimeError(f"FlexAttention needs torch >= 2.5, this is {torch.__version__}")
    saved, _KERNEL = _KERNEL, kernel
    try:
        yield
    finally:
        _KERNEL = saved


def flex_available(device: torch.device) -> bool:
    return flex_attention is not None and device.type == "cuda"


def _same_document_causal(doc_ids: torch.Tensor):
    def same_document_causal(b, h, q, k):
        return (k <= q) & (doc_ids[b, q] == doc_ids[b, k])
    return same_document_causal


MASK_BLOCKS = (128, 64)  # tokens a side of a BlockMask block
# kernel_options of flex_attention for a mask block (None: inductor's defaults, whose sm90 tiles are
# 128 wide). 64: forward 64 x 64 tiles; backward BLOCK_M1 x BLOCK_N1 = 32 x 64 for dk/dv and BLOCK_M2 x
# BLOCK_N2 = 64 x 32 for dq (inductor's autotune list pairs them as (M, N) and (N, M); its search picks
# this one at 64-token blocks, tools/device/flex_tiles.py), 4 warps, 3 stages.
FLEX_TILES = {128: None,
              64: {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3,
                   "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                   "bwd_num_warps": 4, "bwd_num_stages": 3}}


def document_block_mask(doc_ids: torch.Tensor, block: int = 128) -> "BlockMask":
    """FlexAttention BlockMask of causal AND same-document for doc_ids (B, T), blocks of `block` tokens."""
    if block not in MASK_BLOCKS:
        raise ValueError(f"mask block {block} is not one of {MASK_BLOCKS}; set model.mask_block to one of them")
    B, T = doc_ids.shape
    if FLEX_TILES[block] is not None and doc_ids.device.type == "cuda":
        _divisible_bwd_tile()
    return create_block_mask(_same_document_causal(doc_ids), B, None, T, T, device=doc_ids.device, BLOCK_SIZE=block)


def _divisible_bwd_tile() -> None:
    """Let inductor's flex backward lower over blocks smaller than its default tile: its lowering keeps
    only the configurations whose tiles divide the mask's blocks, *then* applies `kernel_options`; the
    default sm90 configuration for 128-dim heads, (64, 128, 128, 64), divides no 64-token block, so the
    lowering had no choice and failed. Inductor's choices (`InductorChoices`, its heuristics' extension
    point) get one more backward configuration of 16-token tiles, which divides every block;
    `FLEX_TILES`'s bwd_ options then replace its tiles. Set on the class, not as the thread's handler:
    a compiled backward is lowered in autograd's device thread, whose handler a thread-local setting
    does not reach (the first H200 probe failed so: NoValidChoicesError). Installed once, on the first
    small-block mask of a CUDA run; 128-token masks compiled after it autotune between the default
    and that candidate (the default wins)."""
    from torch._inductor.choices import InductorChoices
    original = getattr(InductorChoices, "get_flex_attention_bwd_configs", None)
    if original is None:
        raise RuntimeError(f"model.mask_block below 128 needs inductor's flex configuration hook "
                           f"(InductorChoices.get_flex_attention_bwd_configs), not in torch {torch.__version__}; "
                           "set model.mask_block=128")
    if getattr(original, "_megaflow_divisible_bwd", False):
        return
    try:
        from torch._inductor.template_heuristics.triton import FlexBwDConfig
    except ImportError:  # torch releases where template_heuristics is one module
        from torch._inductor.template_heuristics import FlexBwDConfig
    ticket = FlexBwDConfig(16, 16, 16, 16, 1, 4)

    def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
        confs = list(original(self, head_dim, dtype, device_type))
        return confs if ticket in confs else confs + [ticket]
    get_flex_attention_bwd_configs._megaflow_divisible_bwd = True
    InductorChoices.get_flex_attention_bwd_configs = get_flex_attention_bwd_configs


def mask_rows(mask: Mask, doc_ids: Optional[torch.Tensor], start: int, stop: int) -> Mask:
    """Rows start:stop of a batch's `document_mask` (a micro-batch's mask without building it again:
    `create_block_mask` evaluates the rule over every (q, k) block on many small kernels, a host cost
    per call). A BlockMask's block tables are sliced (views) and its rule rebound to the rows' own
    doc_ids (the rule indexes doc_ids by the row within its batch); a dense mask of B rows is sliced,
    one of a single broadcast row and None are returned as they are."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.shape[0] == 1):
        return mask
    if isinstance(mask, torch.Tensor):
        return mask[start:stop]
    return block_mask_rows(mask, start, stop, _same_document_causal(doc_ids[start:stop]))


def block_mask_rows(mask: "BlockMask", start: int, stop: int, mask_mod) -> "BlockMask":
    """Rows start:stop of a BlockMask: its block tables' rows (views, nothing evaluated again) under
    `mask_mod`, the rule indexed by the row within start:stop."""
    take = lambda t: None if t is None else t[start:stop]  # noqa: E731  (B, H, ...) block tables
    return BlockMask.from_kv_blocks(take(mask.kv_num_blocks), take(mask.kv_indices), take(mask.full_kv_num_blocks),
                                    take(mask.full_kv_indices), BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=mask.seq_lengths)


def document_mask(doc_ids: Optional[torch.Tensor], q_len: int, k_len: int, device, block: int = 128) -> Mask:
    """The mask of one forward: a BlockMask (flex) of `block`-token blocks, a dense (B|1, 1, q_len,
    k_len) bool tensor, or None (plain causal). Flex only covers the training/eval shape (q_len ==
    k_len, with doc_ids)."""
    device = torch.device(device)
    if doc_ids is not None and q_len == k_len and _KERNEL != "dense" and (_KERNEL == "flex" or flex_available(device)):
        return document_block_mask(doc_ids, block)
    from megaflow.model.layers import attention_mask  # here: layers.py imports `attend` from this file
    return attention_mask(doc_ids, q_len, k_len, device)


def _flex(q, k, v, block_mask):
    """q (B, Hq, T, hd), k and v (B, Hkv, T, hd): grouped heads read in place, not repeated (the
    repeat's copies and its gradient's sum cost ~0.1 ms a layer at h200_1b's VLM shape)."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cuda":  # eager on CPU (forward only in torch 2.13): the tests' reference
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    tiles = FLEX_TILES.get(block_mask.BLOCK_SIZE[0])  # the mask's (Q, KV) block sizes are equal here
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa, kernel_options=tiles)  # inlined when compiled


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention as two batched matmuls and an fp32 softmax; `allow` a boolean mask broadcastable to
    (B, H, Tq, Tk), or None for plain causal (as SDPA's is_causal; Tq == Tk in every caller). The
    same math as SDPA; on CPU in bf16 it is 2-3x faster than SDPA's flash kernel, whose bf16
    backward is slow at short sequences (fwd+bwd at (128, 2, 64, 64), one thread: 15 vs 47 ms)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if allow is None:
        allow = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()  # (Tq, Tk) causal
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    probs = torch.softmax(scores.masked_fill(~allow, float("-inf")), dim=-1)
    return probs.to(v.dtype) @ v  # (B, H, Tq, hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Scaled dot-product attention of q (B, Hq, Tq, hd) over k, v (B, Hkv, Tk, hd) under `mask`,
    Hq a multiple of Hkv (grouped-query). FlexAttention reads each shared k/v head in place
    (`enable_gqa`); the other kernels get k and v repeated to Hq heads (for SDPA's cuDNN kernel, which
    takes no groups)."""
    if BlockMask is not None and isinstance(mask, BlockMask) and q.shape[-1] >= FLEX_MIN_HEAD_DIM:
        kind = q.device.type
        if torch.is_autocast_enabled(kind):  # SDPA is autocast to bf16; flex_attention is not: cast as SDPA would
            dtype = torch.get_autocast_dtype(kind)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return _flex(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, Hq, Tk, hd)
        v = v.repeat_interleave(groups, dim=1)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and (mask is None or (
            isinstance(mask, torch.Tensor) and mask.dtype == torch.bool)):
        return explicit_attention(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if BlockMask is not None and isinstance(mask, BlockMask):
        # heads too small for FlexAttention (tiny models): the same rule as a dense mask, built here
        dense = create_mask(mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)  # (B, 1, Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
