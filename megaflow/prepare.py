"""Preparing what a run needs before the model is built: the MDS shards of a built-in dataset and
a SentencePiece tokenizer trained on its text, each made once and reused (they live under the
paths the config names, e.g. data_cache/fashion_mnist/).

The build is made atomic like checkpoints: written under a temporary name, renamed when complete,
so an interrupted first run never leaves half a dataset behind that a later run would trust.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("megaflow")

BUILTIN = ("fashion_mnist", "digits", "emoji")


def parse_mix(text: str):
    """'t2i=0.6,i2t=0.4' -> {'t2i': 0.6, 'i2t': 0.4}; '' -> None (the writer's default)."""
    if not text:
        return None
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"train.dataset_mix={text!r}: expected e.g. 't2i=0.6,i2t=0.3,interleaved=0.1'") from None


def ensure_dataset(name: str, out: str, split: str, limit: int = 0, seed: int = 0, mix: str = "") -> None:
    """Build built-in dataset `name` (split) into `out` unless `out/index.json` exists."""
    if (Path(out) / "index.json").is_file():
        return
    if name not in BUILTIN:
        raise FileNotFoundError(f"no MDS data at {out!r} (no index.json) and train.dataset={name!r} is not a built-in "
                                f"dataset to build there; build it with `megaflow data build NAME --out {out}` "
                                f"or set train.dataset to one of {BUILTIN}")
    from data_pipeline.writers import build_dataset
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building %s/%s into %s (first run only)", name, split, out)
    build_dataset(name, tmp, split=split, limit=limit or None, seed=seed, mix=parse_mix(mix))
    if Path(out).exists():
        shutil.rmtree(out)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def dataset_texts(data_dir: str) -> list:
    """Every text segment of an MDS dataset (to train a tokenizer on)."""
    from data_pipeline.streaming_compat import streaming_base
    texts = []
    ds = streaming_base.LocalDataset(local=data_dir)
    for i in range(len(ds)):
        for seg in ds[i]["segments"]:
            if seg["kind"] == "text":
                texts.append(seg["text"])
    return texts


def ensure_tokenizer(path: str, data_dir: str, vocab_size: int = 320) -> None:
    """Train a SentencePiece model on the dataset's text into `path` unless it exists."""
    if Path(path).is_file():
        return
    from data_pipeline.tokenizer import train_sentencepiece
    texts = sorted(set(dataset_texts(data_dir)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    corpus = f"{path}.corpus.txt"
    Path(corpus).write_text("\n".join(texts) + "\n")
    tmp = f"{path}.tmp-{os.getpid()}.model"
    log.info("training a SentencePiece tokenizer (%d distinct texts) into %s", len(texts), path)
    train_sentencepiece(corpus, vocab_size, tmp)
    os.replace(tmp, path)
    vocab_tmp = tmp[: -len(".model")] + ".vocab"
    if os.path.exists(vocab_tmp):
        os.replace(vocab_tmp, path[: -len(".model")] + ".vocab" if path.endswith(".model") else path + ".vocab")
