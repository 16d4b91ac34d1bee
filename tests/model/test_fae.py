"""Tests of the FAE latent space: pixels-mode exactness, training on real digits, meta build,
config validation, freezing, and the checkpoint round trip."""
import pytest
import torch

from megaflow.model.fae import FAE, FAEConfig, patchify, unpatchify
from megaflow.model.fae_train import load_digits_images, load_fae, train_fae

TINY = dict(mode="fae", image_size=16, channels=1, patch_size=4, latent_channels=8, encoder="conv",
            encoder_dim=32, n_heads=4, decoder_dim=32, decoder_layers=2)


@pytest.fixture(scope="module")
def digits():
    return load_digits_images(16)  # (1797, 1, 16, 16) in [-1, 1]


@pytest.mark.parametrize("channels", [1, 3])
def test_pixels_mode_round_trips_exactly(channels):
    """Pixels mode: decode(encode(x)) is bit-identical to x, latents are (B, N, p*p*C), no parameters."""
    cfg = FAEConfig(mode="pixels", image_size=8, channels=channels, patch_size=2)
    fae = FAE(cfg)
    x = torch.rand(3, channels, 8, 8) * 2 - 1
    z = fae.encode(x)
    assert z.shape == (3, cfg.n_tokens, cfg.latent_dim) == (3, 16, 4 * channels)
    assert torch.equal(fae.decode(z), x)
    assert list(fae.parameters()) == []


def test_patchify_order_is_raster_and_channel_last():
    """Patches run left to right, then top to bottom; inside a patch: row, column, then channel."""
    x = torch.arange(2 * 4 * 4).reshape(1, 2, 4, 4)  # channel c, row r, col w -> value c*16 + r*4 + w
    t = patchify(x, 2)
    assert t.shape == (1, 4, 8)
    # patch 1 is the top-right one (rows 0-1, cols 2-3); entries (r, w, c) in that order
    assert t[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]
    # patch 2 is the bottom-left one (rows 2-3, cols 0-1)
    assert t[0, 2].tolist() == [8, 24, 9, 25, 12, 28, 13, 29]
    assert torch.equal(unpatchify(t, 2, 2), x)


def test_training_on_digits_lowers_reconstruction_loss_deterministically(digits):
    """40 steps on real digits cut the held-out loss below 0.7x the initial; same seed, same model."""
    cfg = FAEConfig(**TINY)
    held_out, train = digits[:128], digits[128:]
    init, _ = train_fae(cfg, train, steps=0, seed=0)
    model, history = train_fae(cfg, train, steps=40, lr=2e-3, batch_size=32, seed=0)
    with torch.no_grad():
        before, after = init.loss(held_out), model.loss(held_out)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["pixel_mse"] < 0.7 * before["pixel_mse"]
    again, history2 = train_fae(cfg, train, steps=40, lr=2e-3, batch_size=32, seed=0)
    assert history == history2
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_cosine_schedule_ends_at_min_lr(digits):
    """With min_lr the rate follows a cosine from lr to min_lr: at min_lr=0 the last step changes no
    weight (AdamW without weight decay), so 2 steps equal 1 step; without it the rate stays lr."""
    cfg = FAEConfig(**TINY)
    one, _ = train_fae(cfg, digits[:64], steps=1, lr=2e-3, batch_size=8, seed=0)
    two, _ = train_fae(cfg, digits[:64], steps=2, lr=2e-3, batch_size=8, seed=0, min_lr=0.0)
    const, _ = train_fae(cfg, digits[:64], steps=2, lr=2e-3, batch_size=8, seed=0)
    first = one.state_dict()
    assert all(torch.equal(first[k], v) for k, v in two.state_dict().items())
    assert not all(torch.equal(first[k], v) for k, v in const.state_dict().items())


def test_encode_decode_shapes():
    """FAE mode: encode gives (B, N, C), decode gives images of the input shape."""
    cfg = FAEConfig(**{**TINY, "channels": 3})
    torch.manual_seed(0)
    fae = FAE(cfg)
    fae.init_weights()
    z = fae.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert z.shape == (2, 16, 8) and cfg.latent_dim == 8
    assert fae.decode(z).shape == (2, 3, 16, 16)


def test_meta_build_then_init_equals_ordinary_build():
    """Meta build + to_empty + init_weights gives the same weights as a CPU build + init_weights."""
    cfg = FAEConfig(**TINY)
    with torch.device("meta"):
        meta = FAE(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(7)
    meta.init_weights()
    ref = FAE(cfg)  # a CPU build runs PyTorch's default inits, which draw from the RNG: seed after it
    torch.manual_seed(7)
    ref.init_weights()
    for (k, a), b in zip(meta.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(meta.decode(meta.encode(x)), ref.decode(ref.encode(x)))


@pytest.mark.parametrize("field,value", [
    ("image_size", 18), ("mode", "vae"), ("channels", 2), ("patch_size", 0),
    ("encoder", "resnet"), ("n_heads", 5), ("latent_channels", 0), ("latent_noise", -0.1),
])
def test_bad_config_values_name_field_and_value(field, value):
    """An invalid value raises ValueError whose message names the field and the value."""
    with pytest.raises(ValueError) as err:
        FAEConfig(**{**TINY, field: value})
    assert f"fae.{field}={value!r}" in str(err.value) or f"fae.{field}={value}" in str(err.value)


def test_hf_encoder_with_missing_path_is_a_clear_error(tmp_path):
    """'hf:<dir>' with no such directory raises FileNotFoundError naming the path; nothing downloads."""
    missing = tmp_path / "no_dinov2_here"
    cfg = FAEConfig(**{**TINY, "channels": 3, "encoder": f"hf:{missing}"})
    with pytest.raises(FileNotFoundError, match="no_dinov2_here"):
        FAE(cfg)


def test_freeze_stops_grads_and_encode_is_deterministic():
    """After freeze() no parameter requires grad, the model is in eval mode, encode repeats exactly."""
    torch.manual_seed(0)
    fae = FAE(FAEConfig(**{**TINY, "latent_noise": 0.1}))
    fae.init_weights()
    assert fae.freeze() is fae
    assert not any(p.requires_grad for p in fae.parameters())
    assert not any(m.training for m in fae.modules())
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(fae.encode(x), fae.encode(x))
    assert torch.equal(fae.loss(x)["loss"], fae.loss(x)["loss"])  # no latent noise in eval


def test_save_and_load_round_trip(tmp_path, digits):
    """load_fae(path) rebuilds the config and weights written by train_fae(out_path=...)."""
    path = tmp_path / "fae.pt"
    model, _ = train_fae(FAEConfig(**TINY), digits[:64], steps=2, batch_size=8, seed=1, out_path=str(path))
    loaded = load_fae(str(path))
    assert loaded.cfg == model.cfg
    x = digits[:4]
    assert torch.equal(loaded.encode(x), model.encode(x))
