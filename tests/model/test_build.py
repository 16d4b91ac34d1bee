"""Acceptance 5 and 6 (model issue): the model builds on the meta device (no memory) and
materialises with init_weights(); `megaflow info` prints each part's parameter count; and
megaflow/model/ imports nothing distributed (it stays plain PyTorch)."""
import ast
from pathlib import Path

import torch

from megaflow.cli import count_parameters, main
from megaflow.model.starflow import STARFlow2, build_model
from tests.helpers import make_batch, make_noise, tiny_config

MODEL_DIR = Path(__file__).resolve().parents[2] / "megaflow" / "model"
FORBIDDEN = ("torch.distributed", "deepspeed", "transformer_engine", "parallel", "megaflow.parallel")


def test_meta_build_then_init_weights():
    cfg = tiny_config()
    with torch.device("meta"):
        model = STARFlow2(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ref = build_model(cfg, seed=0)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    batch = make_batch(cfg)
    loss, metrics = model(batch, make_noise(cfg, batch))
    assert torch.isfinite(loss) and metrics["bits_per_dim"] > 0


def test_tied_embeddings_survive_meta_build():
    cfg = tiny_config()
    cfg = type(cfg)(**{**cfg.__dict__, "vlm": type(cfg.vlm)(**{**cfg.vlm.__dict__, "tie_embeddings": True})})
    model = build_model(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_info_prints_each_part(capsys, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  vlm: {dim: 64, n_layers: 4, n_heads: 4, n_kv_heads: 2, ffn_dim: 128, vocab_size: 100}\n"
                        "  flow: {dim: 32, n_heads: 2, ffn_dim: 64, n_layers: 2, ratio: 2}\n")
    assert main(["info", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        from megaflow.config import load_config
        model = STARFlow2(load_config(str(cfg_file)).model)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    for part in ("vlm stream", "visual adapter", "deep flow stream", "shallow flows", "couplings", "total"):
        assert part in out
    assert f"{counts['vlm stream']:,}" in out and f"{counts['total']:,}" in out


def test_model_package_imports_nothing_distributed():
    bad = []
    for path in MODEL_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad += [f"{path.name}: {n}" for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    assert list(MODEL_DIR.rglob("*.py")), "no model files found"
    assert not bad, bad
