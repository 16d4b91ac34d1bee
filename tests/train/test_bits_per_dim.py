"""bits/dim on TarFlow's scale (uniform dequantisation of 8-bit pixels) against the closed form.

At initialisation every flow block is the identity (zero-initialised heads: mu = 0, sigma = 1), so
the model's density of a latent x is the standard normal's and the figures have a closed form:
bits/dim = (mean over image dims of (x^2 / 2 + log(2 pi) / 2) + log 128) / log 2, with
x = (p + u) / 128 - 1 for the TarFlow figure and x = p / 127.5 - 1 + sigma * n for the old
Gaussian-noise one.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from data_pipeline.config import DataConfig
from megaflow.config import Config, ConfigError, load_config
from megaflow.model.fae import FAEConfig, dequantize, patchify
from megaflow.model.starflow import build_model
from megaflow.train import eval_dequantization, evaluate, step_randomness
from tests.helpers import make_batch, tiny_config


def _setup(dequantization: str):
    mcfg = tiny_config(tarflow_only=True, dequantization=dequantization)
    cfg = Config(model=mcfg, data=DataConfig(image_size=8, channels=1, patch_size=2))
    batch = make_batch(mcfg, batch_size=3, seq_len=48)
    g = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, batch["images"].shape, generator=g)  # the 8-bit data
    batch["images"] = pixels.float() / 127.5 - 1.0  # the data pipeline's scaling
    return cfg, build_model(mcfg), batch, pixels


def _closed_form_bits(x: torch.Tensor, valid: torch.Tensor) -> float:
    """x (B, M, ...) latents of the images; the mean over valid images' dims of the standard normal's NLL."""
    nll = (0.5 * x[valid].double().pow(2) + 0.5 * math.log(2 * math.pi)).mean()
    return (float(nll) + math.log(128.0)) / math.log(2.0)


def test_tarflow_bits_per_dim_equals_closed_form_at_init():
    """Contract: a 'gaussian'-trained pixels model reports both figures: bits_per_dim_tarflow is
    the closed form over the uniformly dequantised pixels (p + u) / 128 - 1, bits_per_dim the old
    continuous figure over p / 127.5 - 1 + 0.05 n; they differ."""
    cfg, model, batch, pixels = _setup("gaussian")
    out = evaluate(model, [batch], cfg, torch.device("cpu"), None, 1)
    valid = batch["image_valid"]
    u = eval_dequantization(cfg, batch, 0, "cpu")
    want = _closed_form_bits((pixels.double() + u.double()) / 128.0 - 1.0, valid)
    assert out["bits_per_dim_tarflow"] == pytest.approx(want, abs=1e-5)
    noise, _ = step_randomness(cfg, model.cfg, batch, -1, 0, "cpu")  # (B, M, N, D)
    B, M = valid.shape
    lat = patchify(batch["images"].flatten(0, 1), 2).view(B, M, -1, 4)
    old = _closed_form_bits(lat.double() + 0.05 * noise.double(), valid)
    assert out["bits_per_dim"] == pytest.approx(old, abs=1e-5)
    assert abs(out["bits_per_dim"] - out["bits_per_dim_tarflow"]) > 1e-3


def test_uniform_training_noise_is_tarflow_dequantisation():
    """Contract: with flow.dequantization='uniform' the training step's noise is u ~ U[0, 1) of the
    8-bit pixels, the step's bits/dim is the closed form over (p + u) / 128 - 1, and the held-out
    bits_per_dim is the TarFlow figure itself."""
    cfg, model, batch, pixels = _setup("uniform")
    noise, _ = step_randomness(cfg, model.cfg, batch, 0, 0, "cpu")
    assert noise.min() >= 0 and noise.max() < 1
    _, metrics = model(batch, noise)
    B, M = batch["image_valid"].shape
    p = patchify(pixels.flatten(0, 1).double(), 2).view(B, M, -1, 4)
    want = _closed_form_bits((p + noise.double()) / 128.0 - 1.0, batch["image_valid"])
    assert metrics["bits_per_dim"] == pytest.approx(want, abs=1e-5)
    out = evaluate(model, [batch], cfg, torch.device("cpu"), None, 1)
    assert out["bits_per_dim"] == out["bits_per_dim_tarflow"]


def test_dequantize_recovers_the_8_bit_bin():
    """Contract: dequantize maps p / 127.5 - 1 into p's bin [p / 128 - 1, (p + 1) / 128 - 1)."""
    p = torch.arange(256).float()
    x = dequantize(p / 127.5 - 1.0, torch.full_like(p, 0.999))
    assert torch.all(((x + 1) * 128).floor() == p)


def test_uniform_dequantisation_needs_pixels():
    """Contract: uniform dequantisation of FAE latents is refused with the key to change."""
    with pytest.raises(ValueError, match="flow.dequantization='uniform'.*fae.mode='pixels'"):
        dataclasses.replace(tiny_config(dequantization="uniform"), fae=FAEConfig(mode="fae", image_size=8, patch_size=2))
    with pytest.raises(ConfigError, match="flow.dequantization"):
        load_config(None, ["model.flow.dequantization=laplace"])
