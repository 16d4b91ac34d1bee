"""Attention masks of packed batches, built once per batch and shared by every attention layer.

A packed row holds several documents; a token may attend to earlier tokens of its own document
only (causal AND same doc_id; padding, doc_id -1, attends to padding so no row is fully masked).
Exact implementations of that one rule:
  - FlexAttention (`torch.nn.attention.flex_attention`, compiled) with a `BlockMask` made by
    `create_block_mask`: blocks that are entirely masked (across documents, above the diagonal)
    are skipped, so the cost follows the documents' lengths instead of T^2. Used on CUDA.
  - flash attention's variable-length kernel (`set_doc_kernel("varlen")`, train.doc_attention, CUDA,
    opt-in): the rows are flattened and every document piece, and every row's padding tail, is one
    sequence of `Segments.cu_seqlens`, padded to a fixed number of entries (static shapes for
    compiled regions and the step graph) so only same-document pairs are computed. On h200_1b's
    real rows (1,024 tokens, ~112-token pieces) it was slower than flex (166.1 vs 162.8 ms a step,
    docs/benchmarks.md, round 6), hence not the default.
  - the dense boolean (B, 1, Tq, Tk) mask of `layers.attention_mask` with SDPA: exact everywhere,
    used on CPU (FlexAttention has no CPU backward in torch 2.13) and with a KV cache (generation).
`document_mask` picks one for the device; `attend` runs whichever it is given (None = plain causal,
e.g. the shallow flows, whose sequences are single images); bf16 on CPU under a dense or no mask
runs `explicit_attention` (matmuls and an fp32 softmax) instead of SDPA's slower CPU kernel.
Both streams and all their layers receive the same object through `AttnContext.mask`
(starflow.py `context`).

No rank logic here; sequence-parallel layouts see the full T inside attention.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

try:  # FlexAttention is in torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense path only
    BlockMask = create_block_mask = create_mask = flex_attention = None

FLEX_MIN_HEAD_DIM = 16  # FlexAttention's compiled kernels refuse smaller heads (seen on the H200)

DOC_KERNELS = ("flex", "varlen")
SEGMENT_TOKENS = 64  # "varlen": room for one piece per 64 tokens of the batch on average (document_segments)


class Segments(NamedTuple):
    """A packed batch as flash-attention sequences over its flattened rows (B*T tokens)."""
    cu_seqlens: torch.Tensor  # (S + 1,) int32: sequence starts, then B*T repeated (empty sequences)
    rows: int  # B
    max_len: int  # T: no sequence is longer


Mask = Union[None, torch.Tensor, "BlockMask", Segments]

_KERNEL = "auto"  # "auto": flex on CUDA, dense elsewhere; "flex" / "dense" force one (tests, benchmarks)
_DOC_KERNEL = "flex"  # which exact kernel "flex" means on CUDA: one of DOC_KERNELS (train.doc_attention)
# Made once here (compiling happens at the first call), never inside a function: a `torch.compile(...)`
# met while dynamo traces a compiled block becomes the plain function, and the assignment of it to a
# global is replayed, so a lazily made wrapper turned into eager flex_attention after the first
# compiled forward: every eager call after that (evaluation, compile-off rows of a benchmark) ran
# FlexAttention's slow reference path (1.5 s TP=2 steps on the H200, docs/benchmarks.md issue 17).
_compiled_flex = torch.compile(flex_attention, dynamic=False) if flex_attention is not None else None
try:  # flash varlen (torch >= 2.9); causal is window (-1, 0) in newer releases, is_causal in the first ones
    from torch.nn.attention.varlen import varlen_attn as _varlen
    _VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in inspect.signature(_varlen).parameters \
        else {"is_causal": True}
except ImportError:  # pragma: no cover
    _varlen, _VARLEN_CAUSAL = None, {}


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


def set_doc_kernel(kind: str) -> str:
    """The document-mask kernel of CUDA forwards (train.doc_attention; module docstring); returns
    the one it replaces."""
    global _DOC_KERNEL
    if kind not in DOC_KERNELS:
        raise ValueError(f"train.doc_attention={kind!r} must be one of {DOC_KERNELS}")
    if kind == "varlen" and _varlen is None:
        raise ValueError(f"train.doc_attention=varlen needs torch.nn.attention.varlen (torch >= 2.9), this is "
                         f"torch {torch.__version__}; use 'flex'")
    saved, _DOC_KERNEL = _DOC_KERNEL, kind
    return saved


def flex_available(device: torch.device) -> bool:
    return flex_attention is not None and device.type == "cuda"


def document_block_mask(doc_ids: torch.Tensor) -> "BlockMask":
    """FlexAttention BlockMask of causal AND same-document for doc_ids (B, T)."""
    B, T = doc_ids.shape

    def same_document_causal(b, h, q, k):
        return (k <= q) & (doc_ids[b, q] == doc_ids[b, k])

    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


def document_segments(doc_ids: torch.Tensor, max_segments: int = 0) -> Segments:
    """doc_ids (B, T) -> Segments: a sequence starts at every row start and wherever the doc id
    changes (a piece, or the padding tail), found on the device without reading anything back. The
    starts are padded to `max_segments` (default one per SEGMENT_TOKENS tokens and row, at least 64) with B*T; a batch
    with more sequences than that fails a device-side assert rather than mixing documents."""
    B, T = doc_ids.shape
    S = max_segments or min(B * T, max(64, B * T // SEGMENT_TOKENS + B))  # + B: each row's padding tail
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = starts.flatten()  # (B*T,)
    slot = torch.where(starts, starts.cumsum(0) - 1, S + 1).clamp(max=S + 1)  # the k-th start -> k; others -> S + 1
    cu = torch.full((S + 2,), B * T, dtype=torch.long, device=doc_ids.device)
    cu.scatter_(0, slot, torch.arange(B * T, device=doc_ids.device))  # slot S + 1 collects the rest, dropped
    torch._assert_async(starts.sum() <= S, "more document pieces in the batch than Segments' max_segments")
    cu = cu[:S + 1]  # (S + 1,)
    return Segments(cu.to(torch.int32), B, T)


def _varlen_causal(q, k, v, seg: Segments) -> torch.Tensor:
    """q, k, v (B, H, T, hd) in (B, T, H, hd) memory order (rope.py's) -> (B, H, T, hd), causal within
    each sequence of `seg` (flash varlen over the flattened rows; views where the layout allows)."""
    B, H, T, hd = q.shape
    flat = [x.transpose(1, 2).reshape(B * T, H, hd) for x in (q, k, v)]  # (B*T, H, hd)
    y = _varlen(*flat, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, **_VARLEN_CAUSAL)
    return y.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)


def document_mask(doc_ids: Optional[torch.Tensor], q_len: int, k_len: int, device) -> Mask:
    """The mask of one forward: a BlockMask (flex), a dense (B|1, 1, q_len, k_len) bool tensor, or
    None (plain causal). Flex only covers the training/eval shape (q_len == k_len, with doc_ids)."""
    device = torch.device(device)
    if doc_ids is not None and q_len == k_len and _KERNEL != "dense" and (_KERNEL == "flex" or flex_available(device)):
        if _DOC_KERNEL == "varlen" and (device.type == "cuda" or _KERNEL == "flex"):  # forced: CPU tests
            return document_segments(doc_ids)
        return document_block_mask(doc_ids)
    from megaflow.model.layers import attention_mask  # here: layers.py imports `attend` from this file
    return attention_mask(doc_ids, q_len, k_len, device)


def _flex(q, k, v, block_mask):
    if q.device.type != "cuda":  # eager on CPU (forward only in torch 2.13): the tests' reference
        return flex_attention(q, k, v, block_mask=block_mask)
    return _compiled_flex(q, k, v, block_mask=block_mask)  # inside a compiled region: inlined


def segments_mask(seg: Segments) -> torch.Tensor:
    """The dense (B, 1, T, T) bool mask of `seg`'s rule (causal within each sequence): the reference."""
    B, T = seg.rows, seg.max_len
    seq = torch.searchsorted(seg.cu_seqlens, torch.arange(B * T, device=seg.cu_seqlens.device).int(), right=True)
    seq = seq.view(B, T)  # (B, T) sequence index of every token
    causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
    return (causal & (seq[:, :, None] == seq[:, None, :]))[:, None]  # (B, 1, T, T)


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
    """Scaled dot-product attention of q (B, H, Tq, hd) over k, v (B, H, Tk, hd) under `mask`."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and (mask is None or (
            isinstance(mask, torch.Tensor) and mask.dtype == torch.bool)):
        return explicit_attention(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, Segments):
        if q.device.type != "cuda":  # the rule as a dense mask (CPU tests)
            return attend(q, k, v, segments_mask(mask))
        return _varlen_causal(q, k, v, mask)
    if BlockMask is not None and isinstance(mask, BlockMask) and q.shape[-1] < FLEX_MIN_HEAD_DIM:
        # heads too small for FlexAttention (tiny models): the same rule as a dense mask, built here
        dense = create_mask(mask.mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)  # (B, 1, Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if BlockMask is not None and isinstance(mask, BlockMask):
        kind = q.device.type
        if torch.is_autocast_enabled(kind):  # SDPA is autocast to bf16; flex_attention is not: cast as SDPA would
            dtype = torch.get_autocast_dtype(kind)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return _flex(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
