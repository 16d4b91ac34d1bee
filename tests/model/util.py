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


def triton_device() -> str:
    """Where a Triton kernel's test runs: "cuda", or "cpu" under triton's interpreter (TRITON_INTERPRET=1
    set before triton is imported, triton installed); skips the test otherwise."""
    import importlib.util
    import os

    import pytest
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        return "cpu"
    pytest.skip("no CUDA (nor TRITON_INTERPRET=1 with triton installed) to run the Triton kernel on")
