"""Config: YAML + `--set` overrides are type-checked against the dataclasses; unknown keys and
wrong types are clear errors naming the key; shipped configs load."""
from pathlib import Path

import pytest

from megaflow.config import Config, ConfigError, config_from_dict, load_config, to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_overrides_apply_and_are_typed():
    cfg = load_config(None, ["train.lr=0.001", "model.flow.noise_std=0.1", "train.steps=7", "model.vlm.qkv_bias=true"])
    assert cfg.train.lr == 0.001 and cfg.train.steps == 7 and cfg.model.flow.noise_std == 0.1 and cfg.model.vlm.qkv_bias
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)  # int is a valid float
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 3e-3  # YAML 1.1 reads this as a string


@pytest.mark.parametrize("override,needle", [
    ("train.nope=1", "train.nope"),
    ("model.vlm.dimm=3", "model.vlm.dimm"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("model.vlm.qkv_bias=3", "model.vlm.qkv_bias"),
    ("trainsteps", "a.b=value"),
    ("model.stage=bogus", "bogus"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    cfg = load_config(None, ["model.vlm=null", "model.flow.ratio=0", "model.flow.n_cond_tokens=20"])
    assert cfg.model.vlm is None
    assert config_from_dict(to_dict(cfg)) == cfg


def test_geometry_must_agree():
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, ["data.image_size=64"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    if path.name.startswith("fae_"):
        pytest.skip("FAE-only config, read by megaflow.model.fae_train")
    assert isinstance(load_config(str(path)), Config)


def test_saved_config_keeps_the_wiring_it_was_trained_with():
    """A checkpoint written before model.adapter_input existed was trained with the VLM reading the
    shallow flows' output: loading it must not switch it to the new default."""
    from megaflow.config import saved_config_from_dict
    cfg = load_config(None)
    assert cfg.model.adapter_input == "latent"
    tree = to_dict(cfg)
    assert saved_config_from_dict(tree) == cfg
    old = {**tree, "model": {k: v for k, v in tree["model"].items() if k != "adapter_input"}}
    assert saved_config_from_dict(old).model.adapter_input == "flow"
    assert config_from_dict(old).model.adapter_input == "latent"


def test_fp8_needs_transformer_engine_and_a_gpu(tmp_path):
    """FP8 is Transformer Engine's: asking for it with the local backend, an unknown recipe, or the TE
    backend on a machine without CUDA is refused with what to change (nothing is written)."""
    with pytest.raises(ConfigError, match="parallel.backend=te"):
        load_config(None, ["parallel.fp8=delayed"])
    with pytest.raises(ConfigError, match="'off', 'delayed', 'current'"):
        load_config(None, ["parallel.backend=te", "parallel.fp8=e5m2"])
    assert load_config(None, ["parallel.backend=te", "parallel.fp8=off"]).parallel.fp8 == "off"  # YAML's False
    cfg = load_config(None, ["parallel.backend=te", "parallel.fp8=current", "train.device=cpu",
                             f"train.out_dir={tmp_path / 'run'}"])
    from megaflow.train import run
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*parallel.backend=local and parallel.fp8=off"):
        run(cfg)
    assert not (tmp_path / "run").exists()
