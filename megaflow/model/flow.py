"""TarFlow math in STARFlow's parameterisation, and the shallow flow blocks.

One affine autoregressive step per token: a causal network sees x_<i and outputs (mu_i, a_i);
sigma_i = softplus(a_i + 0.5413) so a zero output is the identity map; both outputs are soft-clipped
c * tanh(o / c). Forward (data -> noise): z = (x - mu) / sigma, log|det| = -sum log sigma.
Inverse (sampling): x = mu + sigma * z, one token at a time with a KV cache.

The deep flow block is not here: it is the flow stream of the Pretzel stack (starflow.py), which
uses `gaussian_params` the same way. Guidance and the score-based denoise step are in generate.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def _net(self, x: torch.Tensor, start: int, cache=None) -> torch.Tensor:
        """Causal network on tokens [start, start + T) -> raw params (M, T, 2D) for the NEXT tokens."""
        M, T, _ = x.shape
        act = self.proj_in.weight.dtype  # the stream's dtype (bf16 parameters); x stays fp32 outside
        pos = torch.arange(start, start + T, device=x.device).expand(M, T)
        cos, sin = rope_tables(pos, self.head_dim, self.rope_theta, act)
        mask = None if cache is None or start == 0 else torch.ones(1, 1, T, start + T, dtype=torch.bool, device=x.device).tril(start)
        ctx = AttnContext(cos, sin, mask, cache)
        h = self.proj_in(x.to(act))  # (M, T, dim)
        for layer in self.layers:
            h = layer(h, ctx)
        return at_least_fp32(self.proj_out(self.norm(h)))  # (M, T, 2D): the flow's parameters in fp32

    def forward(self, x: torch.Tensor):
        """x (M, N, D) -> z (M, N, D), log|det dz/dx| (M,)."""
        xo = self._order(x)
        out = self._net(xo, 0)  # (M, N, 2D)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # params of token i from x_<i
        mu, sigma = gaussian_params(out, self.clip)
        z = (xo - mu) / sigma
        return self._order(z), -sigma.log().sum(dim=(1, 2))

    @torch.no_grad()
    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z (M, N, D) -> x (M, N, D), one token at a time with a KV cache."""
        zo = self._order(z)
        M, N, D = zo.shape
        out = torch.zeros(M, 1, 2 * D, dtype=z.dtype, device=z.device)
        cache, xs = {}, []
        for i in range(N):
            mu, sigma = gaussian_params(out, self.clip)
            xs.append(mu + sigma * zo[:, i:i + 1])  # (M, 1, D)
            if i + 1 < N:
                out = self._net(xs[-1], i, cache)
        return self._order(torch.cat(xs, dim=1))

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
        for block in self.blocks:
            x, ld = block(x)
            logdet = logdet + ld
            sq = sq + x.pow(2).mean(dim=(1, 2))
        return x, logdet, sq

    @torch.no_grad()
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y

    def init_weights(self):
        for block in self.blocks:
            block.init_weights()
