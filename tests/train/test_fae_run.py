"""The FAE latent space in a STARFlow2 run: a pretrained frozen Hugging Face encoder keeps its
weights through the meta build, and a trained FAE file (model.fae.checkpoint) loads into a run.

The encoders are small DINOv2 / SigLIP vision models built from a config with random weights and
saved with `save_pretrained` (no pretrained weights exist offline; the point is that whatever the
directory holds is what the run computes with)."""
from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.config import DataConfig
from megaflow.config import Config, ConfigError, load_config
from megaflow.model.fae import IMAGENET_MEAN, IMAGENET_STD, FAEConfig
from megaflow.model.fae_train import save_fae, train_fae
from megaflow.model.starflow import STAGE_GROUPS, STARFlow2, apply_stage
from megaflow.train import PlainEngine, build, load_model_state, run
from tests.helpers import SPECIAL, VOCAB, make_batch, make_noise, tiny_config
from tests.train.conftest import TINY

TOK = SimpleNamespace(vocab_size=VOCAB, **{k: getattr(SPECIAL, k) for k in
                                             ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id", "image_id")})
FAE_TINY = dict(mode="fae", image_size=8, channels=1, patch_size=2, latent_channels=4, encoder_dim=32,
                n_heads=2, decoder_dim=16, decoder_layers=1)


def save_hf_encoder(kind: str, path) -> str:
    """A random-weight DINOv2 or SigLIP vision model (hidden 32, 2x2 patches of 8x8 images) in `path`."""
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(11)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=2,
                 image_size=8, num_channels=3)
    model = Dinov2Model(Dinov2Config(**shape)) if kind == "dinov2" else SiglipVisionModel(SiglipVisionConfig(**shape))
    model.save_pretrained(path)
    return str(path)


def standalone_features(path: str, images: torch.Tensor) -> torch.Tensor:
    """The saved model's patch tokens (B, 16, 32) of images (B, 1, 8, 8) in [-1, 1], outside megaflow."""
    from transformers import AutoModel
    ref = AutoModel.from_pretrained(path).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = ((images.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std
    with torch.no_grad():
        return ref(pixel_values=x).last_hidden_state[:, -16:]


def run_config(fae: FAEConfig, stage: str = "all") -> Config:
    mcfg = dataclasses.replace(tiny_config(), fae=fae, stage=stage)
    return Config(model=mcfg, data=DataConfig(image_size=8, channels=1, patch_size=2))


@pytest.mark.parametrize("kind", ["dinov2", "siglip"])
def test_hf_encoder_keeps_its_weights_through_build_and_training(tmp_path, kind):
    """Contract: a STARFlow2 built by megaflow.train.build (meta device, to_empty, init_weights)
    with fae.encoder 'hf:<dir>' computes the saved model's own features, before and after a
    training step; no encoder weight is in the optimizer or changes, in any curriculum stage,
    while the step does move the flow; a copy rebuilt on meta and loaded from its state dict
    computes them too (SigLIP's position ids, a buffer HF does not save, included)."""
    path = save_hf_encoder(kind, tmp_path / kind)
    cfg = run_config(FAEConfig(**FAE_TINY, encoder=f"hf:{path}"))
    model = build(cfg, TOK, torch.device("cpu"))
    batch = make_batch(model.cfg, batch_size=2)
    images = batch["images"][batch["image_valid"]]  # (n, 1, 8, 8)
    want = standalone_features(path, images)
    assert torch.allclose(model.fae.features(images), want, atol=1e-6)

    encoder = dict(model.fae.encoder.named_parameters())
    before = {n: p.detach().clone() for n, p in encoder.items()}
    flow_before = model.gauss_head.weight.detach().clone()
    engine = PlainEngine(model, cfg, None)
    assert not {id(p) for p in encoder.values()} & {id(p) for p in engine.params}
    engine.train_step(batch, make_noise(model.cfg, batch), torch.ones(2), lr=1e-2)
    assert not torch.equal(model.gauss_head.weight, flow_before)  # the step was real
    assert all(torch.equal(p, before[n]) for n, p in encoder.items())
    assert torch.allclose(model.fae.features(images), want, atol=1e-6)
    for stage in STAGE_GROUPS:
        apply_stage(model, stage)
        assert not any(p.requires_grad for p in model.fae.parameters()), stage
    with torch.device("meta"):  # a copy rebuilt on meta and loaded from the state dict (sample grids, inference)
        copy = STARFlow2(model.cfg)
    copy.to_empty(device="cpu")
    load_model_state(copy, model.state_dict(), strict=True)
    assert torch.allclose(copy.fae.features(images), want, atol=1e-6)


def test_hf_encoder_that_does_not_fit_is_a_config_error(tmp_path):
    """Contract: an hf: encoder whose hidden size differs from fae.encoder_dim stops the build with
    one line naming both values."""
    path = save_hf_encoder("dinov2", tmp_path / "d")
    cfg = run_config(FAEConfig(**{**FAE_TINY, "encoder_dim": 64}, encoder=f"hf:{path}"))
    with pytest.raises(ConfigError, match="fae.encoder_dim=64 must equal the checkpoint's hidden_size=32"):
        build(cfg, TOK, torch.device("cpu"))


@pytest.fixture(scope="module")
def trained_fae(tmp_path_factory):
    """A conv-encoder FAE trained 5 steps on random images, saved as `megaflow fae --out` saves it."""
    path = tmp_path_factory.mktemp("fae") / "fae.pt"
    model, _ = train_fae(FAEConfig(**FAE_TINY), torch.rand(32, 1, 8, 8) * 2 - 1, steps=5, batch_size=8)
    save_fae(model, str(path))
    return path, model


def test_trained_fae_loads_into_a_run_and_mismatches_are_clear(trained_fae, tmp_path):
    """Contract: model.fae.checkpoint gives the built STARFlow2 the file's FAE (every weight equal,
    the same latents), frozen; a config that differs in a shaping field, a missing file and a
    file that is not an FAE are each one clear error naming the field / file."""
    path, fae = trained_fae
    model = build(run_config(FAEConfig(**FAE_TINY, checkpoint=str(path))), TOK, torch.device("cpu"))
    state = fae.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.fae.state_dict().items())
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(model.fae.encode(images), fae.encode(images))
    assert not any(p.requires_grad for p in model.fae.parameters())

    bad = run_config(FAEConfig(**{**FAE_TINY, "latent_channels": 6}, checkpoint=str(path)))
    with pytest.raises(ConfigError, match="trained with fae.latent_channels=4, but this run has fae.latent_channels=6"):
        build(bad, TOK, torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="fae.checkpoint=.*no such file"):
        build(run_config(FAEConfig(**FAE_TINY, checkpoint=str(tmp_path / "none.pt"))), TOK, torch.device("cpu"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not an FAE file"):
        build(run_config(FAEConfig(**FAE_TINY, checkpoint=str(tmp_path / "other.pt"))), TOK, torch.device("cpu"))


def test_run_checkpoints_carry_the_trained_fae(trained_fae, tiny_sets, tmp_path):
    """Contract: a run started from model.fae.checkpoint saves the FAE's weights in its checkpoint
    (unchanged by training) and resumes from them alone: the FAE file may be gone."""
    path, fae = trained_fae
    own = tmp_path / "fae.pt"
    shutil.copy(path, own)
    fae_sets = [f"model.fae.{k}={v}" for k, v in FAE_TINY.items()] + [f"model.fae.checkpoint={own}"]
    out = tmp_path / "run"
    sets = [*tiny_sets, *fae_sets, f"train.out_dir={out}", "train.steps=2", "train.save_every=0",
            "train.eval_data=", "train.log_every=1"]
    assert run(load_config(str(TINY), sets))["steps"] == 2
    saved = torch.load(out / "checkpoints" / "step_000002" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[f"fae.{k}"], v) for k, v in fae.state_dict().items())
    own.unlink()
    result = run(load_config(str(TINY), [*sets[:-3], "train.steps=3", "train.save_every=0", "train.eval_data="]),
                 resume=True)
    assert result["steps"] == 3
