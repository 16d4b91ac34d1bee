"""Acceptance 4 (model issue): KV-cached sampling equals uncached step-by-step sampling with the
same noise; guidance with w=0 equals conditional sampling; the guidance formula equals a direct
product-of-Gaussians computation."""
import torch

from megaflow.model.flow import guided_params
from megaflow.model.generate import Decoder, generate, sample_images, sample_text
from tests.helpers import SPECIAL, tiny_config
from tests.model.util import randomized_model

PROMPTS = [[SPECIAL.bos_id, 5, 6, 7], [SPECIAL.bos_id, 9]]  # different lengths: left padding


def test_cached_equals_uncached_images_and_text():
    cfg = tiny_config()
    model = randomized_model(cfg, scale=0.1)
    for guidance in (0.0, 2.0):
        a, _ = sample_images(model, PROMPTS, guidance=guidance, seed=5, use_cache=True)
        b, _ = sample_images(model, PROMPTS, guidance=guidance, seed=5, use_cache=False)
        assert (a - b).abs().max() < 1e-5
    image = torch.rand(1, 8, 8) * 2 - 1
    prompts = [[SPECIAL.bos_id, 3, image, 4], [SPECIAL.bos_id, 8]]
    t1 = sample_text(model, prompts, max_new_tokens=6, temperature=1.0, seed=2, use_cache=True)
    t2 = sample_text(model, prompts, max_new_tokens=6, temperature=1.0, seed=2, use_cache=False)
    assert t1 == t2 and len(t1[0]) > 0


def test_guidance_zero_equals_conditional():
    cfg = tiny_config()
    model = randomized_model(cfg, scale=0.1)
    cond, _ = sample_images(model, PROMPTS, guidance=0.0, seed=7)
    w0, _ = sample_images(model, PROMPTS, guidance=1e-12, seed=7)  # takes the guided (2-branch) path
    assert (cond - w0).abs().max() < 1e-5
    strong, _ = sample_images(model, PROMPTS, guidance=3.0, seed=7)
    assert (cond - strong).abs().max() > 1e-3, "guidance had no effect"


def test_guidance_formula_is_product_of_gaussians():
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    sig_u = torch.rand(1000, generator=g) + 0.5
    sig_c = sig_u * (0.2 + 0.8 * torch.rand(1000, generator=g))  # sigma_c <= sigma_u: no clamp
    for w in (0.5, 1.0, 4.0):
        mu, sigma = guided_params(mu_c, sig_c, mu_u, sig_u, w)
        prec = (1 + w) / sig_c**2 - w / sig_u**2  # p_c^(1+w) / p_u^w
        want_mu = ((1 + w) * mu_c / sig_c**2 - w * mu_u / sig_u**2) / prec
        assert torch.allclose(sigma, prec.rsqrt(), rtol=1e-5)
        assert torch.allclose(mu, want_mu, rtol=1e-4, atol=1e-5)
    # where sigma_c > sigma_u the clamp keeps the variance positive and finite
    mu, sigma = guided_params(mu_c, sig_u * 2, mu_u, sig_u, 4.0)
    assert torch.isfinite(sigma).all() and (sigma > 0).all()


def test_interleaved_generation_produces_images_and_text():
    cfg = tiny_config()
    model = randomized_model(cfg, scale=0.1)
    bias = torch.zeros(cfg.vlm.vocab_size)
    bias[SPECIAL.boi_id] = 100.0  # make image-start the greedy choice so the loop goes through an image
    plain = model.text_logits
    model.text_logits = lambda h: plain(h) + bias
    out = generate(model, [SPECIAL.bos_id, 5], max_new_tokens=4, temperature=0.0, seed=1, max_images=1)
    images = [s for s in out if isinstance(s, torch.Tensor)]
    assert len(images) == 1 and images[0].shape == (1, 8, 8)
    assert out[out.index(SPECIAL.boi_id) + 2] == SPECIAL.eoi_id


def test_generated_image_is_reencoded_for_the_vlm():
    """VLM reading FAE latents: after an image is sampled (with guidance rows), the decoder's cache
    holds that image as the VLM reads it in training: its logits for the next text token equal a
    fresh uncached forward over the whole sequence with the image's final latents, and differ from
    what the VLM would have read without the re-encoding (zeros at the image slots)."""
    cfg = tiny_config(adapter_input="latent")
    model = randomized_model(cfg, scale=0.2)
    N = cfg.fae.n_tokens
    images, dec = sample_images(model, PROMPTS, guidance=2.0, seed=3, use_cache=True)
    pixels = model.fae.encode(images)  # pixels mode: the image is the latent, clamped to [-1, 1]
    assert torch.allclose(dec.vlm_x[:2, -N:], dec.vlm_x[2:, -N:]), "guidance rows read another image"
    assert (dec.vlm_x[:2, -N:].clamp(-1, 1) - pixels).abs().max() < 1e-5
    eoi = torch.full((4, 1), SPECIAL.eoi_id)
    dec.feed(eoi)
    cached = dec.next_logits()
    fresh = Decoder(model, 4, dec.cond_keep, use_cache=False)
    fresh.feed(dec.tokens, dec.flow_x, dec.image_mask, dec.doc < 0, dec.vlm_x)
    assert (fresh.next_logits() - cached).abs().max() < 1e-4
    blind = Decoder(model, 4, dec.cond_keep, use_cache=False)
    blind.feed(dec.tokens, dec.flow_x, dec.image_mask, dec.doc < 0, torch.zeros_like(dec.vlm_x))
    assert (blind.next_logits() - cached).abs().max() > 1e-3, "the VLM does not read the image: test proves nothing"
