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
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn


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
        kb, vb = buf
        kb.index_copy_(2, self.slots, k)
        vb.index_copy_(2, self.slots, v)
        return kb[:, :, :self.kv_len], vb[:, :, :self.kv_len]  # (B, Hkv, kv_len, hd)

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
    layers (they carry a `tp_group`) and pipelined models communicate inside a step: run eagerly."""
    if not isinstance(model, nn.Module):
        return False
    p = next(model.parameters(), None)
    return p is not None and p.is_cuda and not any(hasattr(m, "tp_group") for m in model.modules())


class StepGraphs:
    """`graphs(key, fn, *inputs)`: fn(*inputs) eagerly the first time for `key`, then a CUDA graph of
    it replayed on copies of the inputs. fn must read and write only persistent tensors besides its
    inputs, and its output is overwritten by the next replay (read it before the next step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.graphs: dict = {}
        self.replays = 0

    def __call__(self, key, fn: Callable, *inputs: torch.Tensor):
        if not self.enabled:
            return fn(*inputs)
        entry = self.graphs.get(key)
        if entry is None:
            out = fn(*inputs)  # the real step, and the warm-up (lazy cuBLAS/allocator set-up) of the capture
            static_in = tuple(x.clone() for x in inputs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records, does not run: the state is not advanced twice
                static_out = fn(*static_in)
            self.graphs[key] = (graph, static_in, static_out)
            return out
        graph, static_in, static_out = entry
        for s, x in zip(static_in, inputs):
            s.copy_(x)
        graph.replay()
        self.replays += 1
        return static_out

    def clear(self) -> None:
        self.graphs.clear()
