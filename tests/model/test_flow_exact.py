"""Acceptance 1 (model issue): every flow part is exactly invertible and its log-det is the true
log|det J| (float64, autograd Jacobian) on a tiny configuration."""
import pytest
import torch
from torch.autograd.functional import jacobian

from megaflow.model.generate import Decoder, prompt_tensors, sample_latents
from tests.helpers import SPECIAL, tiny_config
from tests.model.util import randomized_model


def _logabsdet(fn, x):
    J = jacobian(fn, x).reshape(x.numel(), x.numel())
    return torch.linalg.slogdet(J)[1]


@pytest.mark.parametrize("block_index", [0, 1])
def test_shallow_block_inverse_and_logdet(block_index):
    """Each shallow block (one identity-order, one reversed): inverse(forward(x)) == x within 1e-4
    (fp32) and its log-det equals log|det dz/dx| from the autograd Jacobian (fp64)."""
    cfg = tiny_config()
    block = randomized_model(cfg, scale=0.2).shallow.blocks[block_index]
    x = torch.randn(3, cfg.fae.n_tokens, cfg.fae.latent_dim)
    z, logdet = block(x)
    assert not torch.allclose(z, x, atol=1e-3), "block is the identity: test would prove nothing"
    assert (block.inverse(z) - x).abs().max() < 1e-4
    block64 = block.double()
    x1 = x[:1].double()
    want = _logabsdet(lambda v: block64(v)[0], x1)
    assert torch.allclose(block64(x1)[1][0], want, rtol=1e-8, atol=1e-8)


def _image_prompt(cfg):
    return [SPECIAL.bos_id, 5, 6, SPECIAL.boi_id]


def _deep_z(model, prompt, y, x=None):
    """Deep flow forward: deep-flow input latents y (1, N, D) after `prompt` -> z (1, N, D), log|det|.
    `x` (1, N, D): the FAE latents the VLM reads at the image slots (as in training), if any."""
    N = y.shape[1]
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, [prompt])
    tokens = torch.cat([tokens, torch.full((1, N), SPECIAL.image_id)], 1)
    image_mask = torch.cat([image_mask, torch.ones(1, N, dtype=torch.bool)], 1)
    flow_x = torch.cat([flow_x.to(y), y], 1)
    vlm_x = torch.cat([vlm_x.to(y), torch.zeros_like(y) if x is None else x], 1)
    T = tokens.shape[1]
    batch = {"tokens": tokens, "position_ids": torch.arange(T)[None], "image_mask": image_mask}
    ctx = model.context(batch)
    state = model.embed(batch, ctx, flow_x=flow_x, vlm_x=vlm_x)
    for unit in model.units.values():
        state = unit(state, ctx)
    z, log_sigma, pred = model.deep_forward(state[1], state[2], image_mask)
    return z[:, -N:], -log_sigma[:, -N:].sum()


@pytest.mark.parametrize("tarflow_only", [False, True])
def test_deep_stream_inverse_and_logdet(tarflow_only):
    """The deep flow (Pretzel stack + Gaussian head, in the context of a text prompt): KV-cached
    sampling with the forward's z gives back y within 1e-4, and the log-det is exact."""
    cfg = tiny_config(tarflow_only=tarflow_only)
    model = randomized_model(cfg, scale=0.2)
    N, D = cfg.fae.n_tokens, cfg.fae.latent_dim
    y = torch.randn(1, N, D)
    with torch.no_grad():
        z, _ = _deep_z(model, _image_prompt(cfg), y)
    assert not torch.allclose(z, y, atol=1e-3)
    dec = Decoder(model, 1)
    dec.feed(*prompt_tensors(model, [_image_prompt(cfg)]))
    y_back = sample_latents(dec, 1, 0.0, 1.0, None, z=z)
    assert (y_back - y).abs().max() < 1e-4
    model64 = model.double()
    y64 = y.double()
    want = _logabsdet(lambda v: _deep_z(model64, _image_prompt(cfg), v.view(1, N, D))[0], y64)
    got = _deep_z(model64, _image_prompt(cfg), y64)[1]
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("adapter_input", ["latent", "flow"])
def test_whole_image_path_inverse_and_logdet(adapter_input):
    """FAE latent -> shallow blocks -> deep flow -> z, and back: exact inverse, exact total log-det.
    The VLM reads the image as in training (the FAE latent, or the shallow flows' output), so a
    path by which a token's prediction saw later tokens would make the Jacobian non-triangular and
    the log-det wrong."""
    cfg = tiny_config(adapter_input=adapter_input)
    model = randomized_model(cfg, scale=0.2)
    N, D = cfg.fae.n_tokens, cfg.fae.latent_dim

    def forward(x):
        y, logdet_s, _ = model.shallow(x)
        z, logdet_d = _deep_z(model, _image_prompt(cfg), y, x)
        return z, logdet_s.sum() + logdet_d

    x = torch.randn(1, N, D)
    with torch.no_grad():
        z, _ = forward(x)
    dec = Decoder(model, 1)
    dec.feed(*prompt_tensors(model, [_image_prompt(cfg)]))
    x_back = model.shallow.inverse(sample_latents(dec, 1, 0.0, 1.0, None, z=z))
    assert (x_back - x).abs().max() < 1e-4
    model = model.double()
    x64 = x.double()
    want = _logabsdet(lambda v: forward(v.view(1, N, D))[0], x64)
    assert torch.allclose(forward(x64)[1], want, rtol=1e-8, atol=1e-8)
