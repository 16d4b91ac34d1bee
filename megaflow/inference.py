"""Loading a trained checkpoint for generation and evaluation: config, tokenizer and weights all
come from the checkpoint directory itself, so it works without the run's data or config files.
Both formats load: a one-process model.pt, and a multi-process run's sharded state/ (any layout;
its pieces are read whole into this process with torch.distributed.checkpoint, no process group)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from megaflow.checkpoint import CheckpointError, load_retrying
from megaflow.config import saved_config_from_dict


def load_checkpoint_tokenizer(ckpt: Path):
    """The tokenizer saved in a checkpoint (train.save flattens its files to `tokenizer.<name>`),
    checked against the special ids recorded beside it."""
    from data_pipeline.tokenizer import load_hf, load_sentencepiece
    meta_file = ckpt / "tokenizer.megaflow_tokenizer.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    sp = ckpt / "tokenizer.tokenizer.model"
    if meta.get("kind") == "hf" or (not meta and (ckpt / "tokenizer.tokenizer.json").is_file()):
        tmp = Path(tempfile.mkdtemp(prefix="megaflow-tok-"))
        try:  # un-flatten into a directory that transformers can read
            for f in ckpt.glob("tokenizer.*"):
                shutil.copyfile(f, tmp / f.name[len("tokenizer."):])
            tok = load_hf(str(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif sp.is_file():
        tok = load_sentencepiece(str(sp))
    else:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} holds no tokenizer (tokenizer.* files)")
    saved = {k: v for k, v in meta.items() if k.endswith("_id") or k == "vocab_size"}
    now = {k: v for k, v in tok.describe().items() if k in saved}
    if saved != now:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: the tokenizer reloads with ids {now} but was saved with "
                              f"{saved}; the tokenizer files are inconsistent")
    return tok


def load_for_inference(path: str | Path, device="cpu"):
    """(model in eval mode, tokenizer, run config, checkpoint dir) from a checkpoint or run dir; if a
    running save prunes the checkpoint while it is read, the newest one is loaded instead."""
    return load_retrying(path, lambda ckpt: _load(ckpt, device))


def _load(ckpt: Path, device):
    from megaflow.train import build, load_weights
    from parallel.checkpoint import is_sharded
    cfg_file = ckpt / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no config.json")
    cfg = saved_config_from_dict(json.loads(cfg_file.read_text()))
    tok = load_checkpoint_tokenizer(ckpt)
    model = build(cfg, tok, torch.device(device), load_from=ckpt)
    if is_sharded(ckpt):  # a multi-process run's shards (any layout), read whole into this process
        load_weights(model, ckpt)
    model.eval()
    return model, tok, cfg, ckpt
