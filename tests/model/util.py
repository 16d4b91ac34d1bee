"""Helpers for model tests: a built tiny model whose zero-initialised parts are made non-zero, so
that exactness and causality tests exercise every path (couplings, adapter, Gaussian heads)."""
import torch

from megaflow.model.starflow import build_model


def randomized_model(cfg, seed: int = 0, scale: float = 0.05, dtype=torch.float32):
    model = build_model(cfg, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0:  # zero-initialised: skips, adapter output, heads, biases
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model
