"""Loading a trained checkpoint for generation and evaluation: config, tokenizer and weights all
come from the checkpoint directory itself, so it works without the run's data or config files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megaflow.checkpoint import CheckpointError, load_file, resolve
from megaflow.config import config_from_dict


def load_checkpoint_tokenizer(ckpt: Path):
    from data_pipeline.tokenizer import load_hf, load_sentencepiece
    sp = ckpt / "tokenizer.tokenizer.model"
    if sp.is_file():
        return load_sentencepiece(str(sp))
    hf = ckpt / "tokenizer.tokenizer.json"
    if hf.is_file():
        tmp = ckpt / "tokenizer"
        return load_hf(str(tmp)) if tmp.is_dir() else load_hf(str(ckpt))
    raise CheckpointError(f"checkpoint {str(ckpt)!r} holds no tokenizer (tokenizer.* files)")


def load_for_inference(path: str | Path, device="cpu"):
    """(model in eval mode, tokenizer, run config, checkpoint dir) from a checkpoint or run dir."""
    from megaflow.train import build
    ckpt = resolve(path)
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no config.json")
    cfg = config_from_dict(json.loads(cfg_file.read_text()))
    tok = load_checkpoint_tokenizer(ckpt)
    model = build(cfg, tok, torch.device(device), load_from=ckpt)
    model.eval()
    return model, tok, cfg, ckpt
