"""TarFlow math in STARFlow's parameterisation, and the shallow flow blocks.

One affine autoregressive step per token: a causal network sees x_<i and outputs (mu_i, a_i);
sigma_i = softplus(a_i + 0.5413) so a zero output is the identity map; both outputs are soft-clipped
c * tanh(o / c). Forward (data -> noise): z = (x - mu) / sigma, log|det| = -sum log sigma.
Inverse (sampling): x = mu + sigma * z, one token at a time with a static KV cache (a CUDA graph
per step on CUDA), or all tokens at once by Jacobi fixed-point iteration.

The deep flow block is not here: it is the flow stream of the Pretzel stack (starflow.py), which
uses `gaussian_params` the same way. Guidance and the score-based denoise step are in generate.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.decoding import StaticKVCache, StepGraphs, additive_mask, can_capture, causal_slot_mask
from megaflow.model.layers import AttnContext, RMSNorm, TransformerBlock, rope_tables

SCALE_OFFSET = math.log(math.e - 1.0)  # softplus^-1(1) = 0.5413: zero output -> sigma = 1


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The flow's variables, parameters and log-dets are computed in fp32 (or wider) whatever the
    dtype of the network that produced them (bf16 under mixed precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gaussian_params(out: torch.Tensor, clip: float):
    """Raw head output (..., 2D) -> (mu, sigma), each (..., D), soft-clipped."""
    mu, a = out.chunk(2, dim=-1)
    mu = clip * torch.tanh(mu / clip)
    a = clip * torch.tanh(a / clip)
    return mu, F.softplus(a + SCALE_OFFSET)


def guided_params(mu_c, sigma_c, mu_u, sigma_u, w: float):
    """STARFlow's classifier-free guidance as a product of Gaussians p_c^(1+w) / p_u^w.
    s = min(sigma_c / sigma_u, 1)^2 keeps the product's variance positive."""
    s = (sigma_c / sigma_u).clamp(max=1.0) ** 2
    denom = 1.0 + w - w * s
    return ((1.0 + w) * mu_c - w * s * mu_u) / denom, sigma_c / denom.sqrt()


class ShallowFlowBlock(nn.Module):
    """One unconditional TarFlow block over the N latent tokens of a single image.

    `reverse` flips the autoregression order (TarFlow alternates it between blocks); the token
    order outside the block is always raster order. Token 0 of the block's order gets the identity
    transform (the causal network has nothing before it to condition on)."""

    def __init__(self, latent_dim: int, n_tokens: int, dim: int, n_heads: int, n_layers: int,
                 reverse: bool, clip: float, eps: float = 1e-5, rope_theta: float = 10000.0, ffn_dim: int = 0):
        super().__init__()
        self.reverse, self.clip, self.rope_theta = reverse, clip, rope_theta
        self.head_dim = dim // n_heads
        self.proj_in = nn.Linear(latent_dim, dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_heads, n_heads, self.head_dim, ffn_dim or 4 * dim, eps) for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps)
        self.proj_out = nn.Linear(dim, 2 * latent_dim)

    def _order(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) if self.reverse else x

    def rope(self, n: int, x: torch.Tensor) -> tuple:
        """RoPE tables of positions 0..n-1 in the stream's dtype, each (1, 1, n, head_dim)."""
        return rope_tables(torch.arange(n, device=x.device)[None], self.head_dim, self.rope_theta,
                           self.proj_in.weight.dtype)

    def _net(self, x: torch.Tensor, slots=None, cache=None, kv_len: int = 0, rope=None) -> torch.Tensor:
        """Causal network on tokens at positions `slots` (T,) (default 0..T-1) -> raw params
        (M, T, 2D) for the NEXT tokens. With a cache, attends to its slots [0, kv_len). `rope`:
        tables of every position (`self.rope`), looked up instead of recomputed."""
        M, T, _ = x.shape
        act = self.proj_in.weight.dtype  # the stream's dtype (bf16 parameters); x stays fp32 outside
        if slots is None and rope is not None:
            cos, sin = rope[0][:, :, :T], rope[1][:, :, :T]  # (1, 1, T, hd): positions 0..T-1
        else:
            if slots is None:
                slots = torch.arange(T, device=x.device)
            if rope is None:  # (1, 1, T, hd), broadcast over the M rows
                cos, sin = rope_tables(slots[None], self.head_dim, self.rope_theta, act)
            else:
                cos, sin = rope[0].index_select(2, slots), rope[1].index_select(2, slots)  # (1, 1, T, hd)
        mask = None
        if cache is not None:
            mask = additive_mask(causal_slot_mask(slots, kv_len), act)  # (1, 1, T, kv_len)
            cache.slots, cache.kv_len = slots, kv_len
        return self.head(self.trunk(x, AttnContext(cos, sin, mask, cache)))

    def trunk(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Tokens x (M, T, D) in fp32 -> the last layer's hidden states (M, T, dim) in the stream's dtype."""
        h = self.proj_in(x.to(self.proj_in.weight.dtype))  # (M, T, dim)
        for layer in self.layers:
            h = layer(h, ctx)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (M, T, dim) -> raw params (M, T, 2D), the flow's parameters in fp32."""
        return at_least_fp32(self.proj_out(self.norm(h)))

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None):
        """x (M, N, D) -> z (M, N, D), log|det dz/dx| (M,). `rope`: `self.rope(N, x)`, made here if not given."""
        z, logdet = self.coupling(self._order(x), self.rope(x.shape[1], x) if rope is None else rope)
        return self._order(z), logdet

    def coupling(self, xo: torch.Tensor, rope: Optional[tuple] = None):
        """The affine map on block-ordered tokens xo (M, N, D) -> z (M, N, D) in the same order,
        log|det dz/dx| (M,). (One region of megaflow/speed.py's compilation.) `rope`: the RoPE tables
        (`self.rope`), made outside: a table made inside a compiled region is not kept but recomputed
        (pow, cos, sin) for every element that RoPE touches, forward and backward (17-19% of a
        one-thread CPU step of configs/tarflow_fmnist28.yaml)."""
        if rope is None:
            rope = self.rope(xo.shape[1], xo)
        return self.affine(self.trunk(xo, AttnContext(*rope)), xo)

    def affine(self, h: torch.Tensor, xo: torch.Tensor):
        """The last layer's hidden states h (M, N, dim) and the block-ordered tokens xo (M, N, D) ->
        z (M, N, D), log|det dz/dx| (M,): the final norm, the head, the Gaussian parameters and the
        affine map with its log-det. (Its own compiled region in megaflow/speed.py's block scope, where
        eager it would run its fp32 norm and small ops as separate kernels.)"""
        mu, sigma = self._params(self.head(h))  # (M, N, D) each: token i's from x_<i
        z = (xo - mu) / sigma
        return z, -sigma.log().sum(dim=(1, 2))

    def _params(self, out: torch.Tensor):
        """Raw params of x_<i at rows i (M, N, 2D) -> (mu, sigma) of each token: token 0 gets none."""
        return gaussian_params(torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1), self.clip)

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, method: str = "sequential", tol: float = 1e-4,
                max_iters: Optional[int] = None, graphs: Optional[bool] = None,
                stats: Optional[list] = None, chunk: int = 64) -> torch.Tensor:
        """z (M, N, D) -> x (M, N, D); `stats` (a list) receives the iterations. "sequential": one
        token at a time with a static KV cache (N steps; a CUDA graph per step on CUDA unless
        graphs=False). "jacobi": windows of `chunk` tokens in order (STARFlow's block-wise Jacobi);
        in a window all tokens are updated in parallel, x <- mu(x_<i) + sigma(x_<i) * z, until the
        largest change is <= tol, at most max_iters times (default: the window's length - 1, after
        which it is exact: its first token starts exact, and the k-th is final after k updates);
        the window's cache entries are then recomputed from the final values for the next window."""
        zo = at_least_fp32(self._order(z))  # the flow's variables in fp32 under bf16 weights
        M, N, D = zo.shape
        if method == "jacobi":
            x, total = self._jacobi(zo, tol, max_iters, chunk, graphs)
            if stats is not None:
                stats.append(total)
            return self._order(x)
        if method != "sequential":
            raise ValueError(f"unknown sampling method {method!r}; choose 'sequential' or 'jacobi'")
        cache = StaticKVCache(N)
        xs = torch.zeros_like(zo)  # (M, N, D), filled token by token
        out = zo.new_zeros(M, 1, 2 * D)  # raw params of the next token (identity for token 0)
        slot = torch.zeros(1, dtype=torch.long, device=z.device)
        rope = self.rope(N, zo)
        capture = can_capture(self) if graphs is None else bool(graphs) and z.is_cuda
        static = capture or bool(graphs)  # every step attends to all N slots: graph shapes
        step_graphs = StepGraphs(capture, self, static)  # layers compiled before capture (decoding.py)

        def step(zi: torch.Tensor, kv_len: int) -> None:  # zi (M, 1, D): token `slot` from `out`
            mu, sigma = gaussian_params(out, self.clip)
            x = mu + sigma * zi  # (M, 1, D)
            xs.index_copy_(1, slot, x)
            out.copy_(self._net(x, slot, cache, kv_len, rope))

        for i in range(N - 1):  # the last token's params are not needed
            slot.fill_(i)
            kv_len = N if static else i + 1
            step_graphs(("shallow", M, kv_len), lambda zi: step(zi, kv_len), zo[:, i:i + 1])
        if stats is not None:
            stats.append(N)
        mu, sigma = gaussian_params(out, self.clip)
        xs[:, N - 1:] = mu + sigma * zo[:, N - 1:]
        return self._order(xs)

    def _jacobi(self, zo: torch.Tensor, tol: float, max_iters: Optional[int], chunk: int,
                graphs: Optional[bool] = None) -> tuple:
        """Block-wise Jacobi on block-ordered noise zo (M, N, D) -> (x, total iterations). Every
        window attends to all N cache slots (causal mask), so an iteration has the same shapes in
        every window of a length: on CUDA it is one replayed graph (layers compiled), and the only
        host work per iteration is reading the largest change."""
        M, N, D = zo.shape
        cache, x, total, rope = StaticKVCache(N), torch.empty_like(zo), 0, self.rope(N, zo)
        before = zo.new_zeros(M, 1, 2 * D)  # raw params of the window's first token (from the one before)
        capture = can_capture(self) if graphs is None else bool(graphs) and zo.is_cuda
        step_graphs, windows = StepGraphs(capture, self, True), {}
        for c in range(0, N, chunk):
            e = min(c + chunk, N)
            slots = torch.arange(c, e, device=zo.device)
            xw = windows.setdefault(e - c, zo.new_empty(M, e - c, D))  # (M, e - c, D): one per length, as graphs need

            def iterate(zc: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:  # -> largest change, a 0-d tensor
                out = self._net(xw, sl, cache, N, rope)  # (M, e - c, 2D)
                mu, sigma = gaussian_params(torch.cat([before, out[:, :-1]], dim=1), self.clip)
                new = mu + sigma * zc
                delta = (new - xw).abs().amax()
                xw.copy_(new)
                return delta

            mu, sigma = gaussian_params(before, self.clip)
            xw.copy_(mu + sigma * zo[:, c:e])  # the window's first token exact, the others a guess
            for _ in range(max_iters or e - c - 1):  # by then exact: the k-th token is final after k updates
                delta = float(step_graphs(("jacobi", M, e - c), iterate, zo[:, c:e], slots))
                total += 1
                if delta <= tol:
                    break
            x[:, c:e] = xw
            if e < N:  # the cache and the next window's first params from the final values
                before.copy_(self._net(xw, slots, cache, N, rope)[:, -1:])
        return x, total

    def init_weights(self, std: float = 0.02):
        nn.init.normal_(self.proj_in.weight, std=std)
        nn.init.zeros_(self.proj_in.bias)
        for layer in self.layers:
            layer.init_weights(std, std / math.sqrt(2 * len(self.layers)))
        self.norm.init_weights()
        nn.init.zeros_(self.proj_out.weight)  # identity map at initialisation
        nn.init.zeros_(self.proj_out.bias)


class ShallowFlows(nn.Module):
    """The shallow blocks, applied data -> deep-flow input. The last block runs in reversed order so
    that it alternates with the deep block after it, whose order is the sequence order."""

    def __init__(self, n_blocks: int, latent_dim: int, n_tokens: int, dim: int, n_heads: int,
                 n_layers: int, clip: float, eps: float = 1e-5, ffn_dim: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(
            ShallowFlowBlock(latent_dim, n_tokens, dim, n_heads, n_layers, (n_blocks - i) % 2 == 1, clip, eps,
                             ffn_dim=ffn_dim)
            for i in range(n_blocks))

    def forward(self, x: torch.Tensor):
        """x (M, N, D) -> y (M, N, D), log|det| (M,), sum over blocks of mean(output^2) (M,)."""
        logdet = x.new_zeros(x.shape[0])
        sq = x.new_zeros(x.shape[0])
        rope = self.blocks[0].rope(x.shape[1], x) if len(self.blocks) else None  # one table for every block
        for block in self.blocks:
            x, ld = block(x, rope)
            logdet = logdet + ld
            sq = sq + x.pow(2).mean(dim=(1, 2))
        return x, logdet, sq

    @torch.no_grad()
    def inverse(self, y: torch.Tensor, method: str = "sequential", tol: float = 1e-4,
                max_iters: Optional[int] = None, graphs: Optional[bool] = None,
                stats: Optional[list] = None, chunk: int = 64) -> torch.Tensor:
        """y (M, N, D) -> x (M, N, D); `stats` (a list) receives each block's iteration count
        (options as in ShallowFlowBlock.inverse)."""
        for block in reversed(self.blocks):
            y = block.inverse(y, method, tol, max_iters, graphs, stats, chunk)
        return y

    def init_weights(self):
        for block in self.blocks:
            block.init_weights()
