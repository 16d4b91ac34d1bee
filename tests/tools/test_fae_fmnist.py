"""tools/fae_fmnist.py and configs/starflow_fae_fmnist32.yaml end to end at a toy budget.

Contract: the recipe of the FAE-latent run works as a user runs it, in order: (1) a supervised
ViT encoder on Fashion-MNIST's training split is saved as a Hugging Face checkpoint with its test
accuracy; (2) the FAE over that frozen encoder is saved with a finite held-out PSNR; (3) the
shipped STARFlow2 config, pointed at both (`hf:` encoder, `fae.checkpoint`), trains, evaluates
and writes the quality report with generation and understanding figures, its FAE equal to the
file's. Budgets are a few steps (the figures themselves are in docs/benchmarks.md).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

import megaflow.quality as quality
from megaflow.config import load_config
from megaflow.train import run
from tools.fae_fmnist import main

REPO = Path(__file__).resolve().parents[2]
SMALL_MODEL = ["model.vlm.dim=32", "model.vlm.n_layers=2", "model.vlm.ffn_dim=64", "model.flow.dim=32",
               "model.flow.n_layers=2", "model.flow.ffn_dim=64", "model.flow.n_shallow=1", "model.flow.shallow_layers=1",
               "model.flow.shallow_dim=16", "model.flow.shallow_heads=2"]


def test_encoder_fae_and_starflow_run_in_that_latent_space(tmp_path, monkeypatch, capsys):
    enc = tmp_path / "vit"
    assert main(["encoder", "--out", str(enc), "--dim", "32", "--layers", "1", "--heads", "2",
                 "--max-steps", "2", "--batch-size", "16"]) == 0
    acc = json.loads((enc / "train_result.json").read_text())["test_accuracy"]
    assert 0.0 <= acc <= 1.0 and (enc / "config.json").is_file() and (enc / "preprocessor_config.json").is_file()

    fae_cfg = yaml.safe_load((REPO / "configs" / "fae_fmnist32.yaml").read_text())
    fae_cfg["fae"].update(encoder=f"hf:{enc}", encoder_dim=32, n_heads=2, decoder_dim=16, decoder_layers=1)
    (tmp_path / "fae.yaml").write_text(yaml.safe_dump(fae_cfg))
    fae_file, figures = tmp_path / "fae.pt", tmp_path / "fae.json"
    assert main(["fae", "--config", str(tmp_path / "fae.yaml"), "--out", str(fae_file), "--steps", "2",
                 "--held-out", "20", "--json", str(figures)]) == 0
    assert math.isfinite(json.loads(figures.read_text())["psnr_db"])

    class Blind(torch.nn.Module):  # the real classifier takes minutes to train when not cached
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)
    monkeypatch.setattr(quality, "train_classifier", lambda *a, **k: (Blind(), 1.0))
    fae_sets = [f"model.fae.{k}={v}" for k, v in fae_cfg["fae"].items() if k not in ("latent_noise",)]
    out = tmp_path / "run"
    cfg = load_config(str(REPO / "configs" / "starflow_fae_fmnist32.yaml"), [
        *fae_sets, f"model.fae.checkpoint={fae_file}", f"data.local={tmp_path}/fm/train",
        f"train.eval_data={tmp_path}/fm/test", f"data.tokenizer.path={tmp_path}/fm/tokenizer.model",
        "train.dataset_limit=40", "train.eval_limit=8", "train.steps=2", "train.save_every=0", "train.eval_batches=1",
        "train.report_samples=1", "train.report_images=4", "train.threads=2", "train.device=cpu", "train.guidance=0",
        *SMALL_MODEL,
        f"train.out_dir={out}", "train.log_every=1"])
    assert cfg.model.fae.mode == "fae" and cfg.model.fae.encoder == f"hf:{enc}"
    result = run(cfg)
    assert result["steps"] == 2 and math.isfinite(result["eval"]["bits_per_dim"])
    assert "bits_per_dim_tarflow" not in result["eval"]  # FAE latents: no pixel bits
    assert {"generation_accuracy", "understanding_accuracy"} <= result["report"].keys()
    saved = torch.load(out / "checkpoints" / "step_000002" / "model.pt", weights_only=True)
    trained = torch.load(fae_file, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"fae.{k}"], v) for k, v in trained.items())
    capsys.readouterr()
