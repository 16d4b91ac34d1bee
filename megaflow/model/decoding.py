"""Decoding machinery shared by the deep flow's Decoder (generate.py) and the shallow flows' inverse
(flow.py): preallocated KV caches, and one decode step replayed as a CUDA graph.

`StaticKVCache`: every attention layer's keys and values live in buffers of a fixed capacity
(rows, kv_heads, capacity, head_dim), allocated at the layer's first update. A forward writes its
positions at `slots` (index_copy_, no torch.cat) and attends to the first `kv_len` slots under a mask
the caller builds. Causality hides every slot after a query, so truncating the sequence is just
moving the write position, and stale entries past it are never read. With `kv_len` = capacity every
one-token step has the same shapes and buffers: what a CUDA graph needs.

`ConcatKVCache`: the cache as it was before (grown by torch.cat at every token); kept as the
reference the static cache is tested against.

`StepGraphs`: runs a step function eagerly the first time, captures it as a CUDA graph, and replays
the graph afterwards. Disabled (CPU, or a model with collectives inside a step), the same function
simply runs, so the CPU tests cover the math of what the GPU replays. No torch.distributed here.

`compiled_layers`: while a step (one token, or a Jacobi window) is first run and captured, every
transformer layer's cached forward goes through ONE torch.compile'd function (inductor fuses the
~35 small kernels of a layer's step: norm casts, RoPE, cache writes, SiLU x up, residual adds,
around its GEMMs and attention; 1.9x faster steps on the H200). The layer gets its own `LayerCache`
view (its buffers, the step's slots) instead of the shared cache, so no layer key is baked into the
graph and every layer of one shape shares the compiled code. Default ("auto"): compiled wherever
steps are captured as CUDA graphs; `compile_steps(backend)` forces a backend ("off", "aot_eager"
for CPU tests, "inductor").
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

from megaflow.model.layers import AttnContext, TransformerBlock

_COMPILE = "auto"  # "auto": inductor where steps are captured; "off"; or a torch.compile backend for every step
_compiled: dict = {}  # backend -> the compiled layer function


class StaticKVCache:
    """Preallocated (rows, kv_heads, capacity, head_dim) keys/values per attention layer."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffers: dict = {}
        self.slots: Optional[torch.Tensor] = None  # (T,) long: where this forward's positions go
        self.kv_len = 0  # key slots the current forward attends to (its mask's last dim)

    def update(self, key, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, hd) at `slots`; return keys/values of slots [0, kv_len)."""
        buf = self.buffers.get(key)
        if buf is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            buf = self.buffers[key] = (k.new_zeros(shape), v.new_zeros(shape))
        return LayerCache(*buf, self.slots, self.kv_len).update(key, k, v)

    def grow(self, capacity: int) -> None:
        """Larger buffers, keeping what is written (invalidates captured graphs)."""
        for key, (kb, vb) in self.buffers.items():
            shape = (*kb.shape[:2], capacity, kb.shape[3])
            nk, nv = kb.new_zeros(shape), vb.new_zeros(shape)
            nk[:, :, :self.capacity], nv[:, :, :self.capacity] = kb, vb
            self.buffers[key] = (nk, nv)
        self.capacity = capacity

    def truncate(self, length: int) -> None:
        pass  # causal masks never read slots at or after the write position


class LayerCache:
    """One layer's part of a StaticKVCache: its (rows, kv_heads, capacity, head_dim) buffers and this
    forward's slots and kv_len. Compiled layers get this (the key is ignored), not the shared cache."""

    def __init__(self, kb: torch.Tensor, vb: torch.Tensor, slots: torch.Tensor, kv_len: int):
        self.kb, self.vb, self.slots, self.kv_len = kb, vb, slots, kv_len

    def update(self, key, k: torch.Tensor, v: torch.Tensor):
        self.kb.index_copy_(2, self.slots, k)  # in place (inductor keeps it so: no buffer copy)
        self.vb.index_copy_(2, self.slots, v)
        return self.kb[:, :, :self.kv_len], self.vb[:, :, :self.kv_len]  # (B, Hkv, kv_len, hd)


class ConcatKVCache:
    """The earlier cache: each layer's (k, v) grown by torch.cat; positions must be appended in order."""

    def __init__(self, capacity: int = 0):
        self.buffers: dict = {}
        self.slots, self.kv_len = None, 0

    def update(self, key, k: torch.Tensor, v: torch.Tensor):
        past = self.buffers.get(key)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, Hkv, Tk, hd)
        self.buffers[key] = (k, v)
        return k, v

    def grow(self, capacity: int) -> None:
        pass

    def truncate(self, length: int) -> None:
        for key, (k, v) in self.buffers.items():
            self.buffers[key] = (k[:, :, :length], v[:, :, :length])


def causal_slot_mask(slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(1, 1, T, kv_len) allow-mask: the query at slot s sees key slots <= s."""
    return (torch.arange(kv_len, device=slots.device) <= slots[:, None])[None, None]


def additive_mask(allow: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean allow-mask -> 0 / -inf scores of `dtype`, once per step: given a boolean mask,
    scaled_dot_product_attention converts it in every layer (kernels a decode step is made of)."""
    return torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill_(~allow, float("-inf"))


def can_capture(model) -> bool:
    """CUDA graphs by default: a plain single-process module on a CUDA device. Tensor-parallel
    layers (they carry a `tp_group`), pipelined models and parameters held elsewhere (ZeRO-3 leaves
    empty tensors that its hooks gather for each forward) communicate inside a step: run eagerly."""
    if not isinstance(model, nn.Module):
        return False
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda and not communicates_in_step(model)


def communicates_in_step(model: nn.Module) -> bool:
    """Tensor-parallel layers, or parameters partitioned away (ZeRO-3's empty placeholders)."""
    return (any(hasattr(m, "tp_group") for m in model.modules())
            or any(p.numel() == 0 for p in model.parameters()))


@contextlib.contextmanager
def compile_steps(backend: str):
    """Inside the block, decode steps compile their layers with `backend` ("auto", "off", or a
    torch.compile backend such as "inductor" or "aot_eager"), captured or not."""
    global _COMPILE
    saved, _COMPILE = _COMPILE, backend
    try:
        yield
    finally:
        _COMPILE = saved


def step_backend(captured: bool, static: bool) -> Optional[str]:
    """The backend that compiles a step's layers: inductor for captured steps under "auto"; a forced
    backend for any graph-shaped (static) step; None: eager."""
    if _COMPILE == "auto":
        return "inductor" if captured else None
    return None if _COMPILE == "off" or not static else _COMPILE


def _decode_layer(block: TransformerBlock, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """The compiled function: a layer's own forward (the block is an input, so one graph per shape)."""
    return TransformerBlock.forward(block, x, ctx)


@contextlib.contextmanager
def compiled_layers(module: Optional[nn.Module], backend: Optional[str]):
    """Inside: the forwards with a StaticKVCache of `module`'s transformer layers (the graph-shaped
    steps of StepGraphs: one token, or a Jacobi window, attending to every slot) run
    `_decode_layer` compiled with `backend` (None: nothing changes). A layer's first forward of a
    cache runs eagerly too, to allocate its buffers. The layers' own forwards are restored after."""
    if backend is None or module is None:
        yield
        return
    if backend not in _compiled:
        for name in ("cache_size_limit", "recompile_limit"):  # a graph per layer shape and row count
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
        _compiled[backend] = torch.compile(_decode_layer, backend=backend)
    fn = _compiled[backend]
    blocks = [m for m in module.modules() if isinstance(m, TransformerBlock)]
    saved = [b.__dict__.get("forward") for b in blocks]

    def routed(x, ctx, _block, _eager):
        cache = ctx.cache
        if not isinstance(cache, StaticKVCache) or torch.is_grad_enabled():
            return _eager(x, ctx)
        key = _block.self_attn.cache_key
        if key not in cache.buffers:
            _eager(x, ctx)  # allocates this layer's buffers; the same slot is written again below
        view = LayerCache(*cache.buffers[key], cache.slots, cache.kv_len)
        return fn(_block, x, AttnContext(ctx.cos, ctx.sin, ctx.mask, view))

    for block in blocks:
        block.forward = lambda x, ctx, _b=block, _e=block.forward: routed(x, ctx, _b, _e)
    try:
        yield
    finally:
        for block, fwd in zip(blocks, saved):
            if fwd is None:
                del block.forward
            else:
                block.forward = fwd


class StepGraphs:
    """`graphs(key, fn, *inputs)`: fn(*inputs) eagerly the first time for `key`, then a CUDA graph of
    it replayed on copies of the inputs. fn must read and write only persistent tensors besides its
    inputs, and its output is overwritten by the next replay (read it before the next step).
    `module`'s layers run compiled (compiled_layers) in the steps when `step_backend` says so;
    `static`: the steps have graph shapes even when not captured (CPU tests of the compiled path)."""

    def __init__(self, enabled: bool, module: Optional[nn.Module] = None, static: bool = False):
        self.enabled = enabled
        self.graphs: dict = {}
        self.replays = 0
        self.module, self.backend = module, step_backend(enabled, static or enabled)

    def __call__(self, key, fn: Callable, *inputs: torch.Tensor):
        if not self.enabled:
            return self._first(fn, inputs)
        entry = self.graphs.get(key)
        if entry is None:
            out = self._first(fn, inputs)  # the real step; compiles the layers outside the capture
            with compiled_layers(self.module, self.backend):
                self._capture(key, fn, inputs)
            return out
        graph, static_in, static_out = entry
        for s, x in zip(static_in, inputs):
            s.copy_(x)
        graph.replay()
        self.replays += 1
        return static_out

    def _first(self, fn: Callable, inputs: tuple):
        """fn(*inputs) with compiled layers; should compiling fail, warn once and run it eagerly. Running
        a failed step again is safe: until its last writes (the state the next step reads) it writes
        only its own slots, from inputs it has not changed."""
        global _COMPILE
        try:
            with compiled_layers(self.module, self.backend):
                return fn(*inputs)
        except Exception as e:  # noqa: BLE001  (torch.compile raises many kinds)
            if self.backend is None:
                raise
            warnings.warn(f"decode steps: torch.compile ({self.backend}) failed, running eagerly: "
                          f"{type(e).__name__}: {str(e)[:300]}")
            _COMPILE, self.backend = "off", None
            return fn(*inputs)

    def _capture(self, key, fn: Callable, inputs: tuple) -> None:
        static_in = tuple(x.clone() for x in inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # records, does not run: the state is not advanced twice; thread-local, as megaflow/step_graph.py's
        # capture: another thread's CUDA calls (data.prefetch pinning a batch during training) must not break it
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = fn(*static_in)
        self.graphs[key] = (graph, static_in, static_out)

    def clear(self) -> None:
        self.graphs.clear()
