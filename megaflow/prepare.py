"""Preparing what a run needs before the model is built: the MDS shards of a built-in dataset and
a SentencePiece tokenizer trained on its text, each made once and reused (they live under the
paths the config names, e.g. data_cache/fashion_mnist/).

The build is made atomic like checkpoints: written under a temporary name, renamed when complete,
so an interrupted first run never leaves half a dataset behind that a later run would trust.
Nothing megaflow did not write is ever deleted: a dataset is built only into an absent or empty
directory, or one that carries the `.megaflow-built` marker of an earlier build; any other directory
without index.json stops the run with an error naming it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

from megaflow.config import ConfigError

log = logging.getLogger("megaflow")

BUILTIN = ("fashion_mnist", "digits", "emoji")
MARKER = ".megaflow-built"  # written into every dataset directory megaflow builds


@contextlib.contextmanager
def prepare_lock(data_dir: str):
    """An exclusive lock (flock on DATA_DIR.lock, created beside it) held while data is prepared: the
    first process of each node may prepare, and on a shared filesystem only one builds at a time."""
    lock = Path(f"{str(data_dir).rstrip('/')}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def parse_mix(text: str):
    """'t2i=0.6,i2t=0.4' -> {'t2i': 0.6, 'i2t': 0.4}; '' -> None (the writer's default)."""
    if not text:
        return None
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"train.dataset_mix={text!r}: expected e.g. 't2i=0.6,i2t=0.3,interleaved=0.1'") from None


def ensure_dataset(name: str, out: str, split: str, limit: int = 0, seed: int = 0, mix: str = "",
                   key: str = "data.local") -> None:
    """Build built-in dataset `name` (split) into `out` unless `out/index.json` exists. `key` is the
    config key that names `out` (for the error messages)."""
    if (Path(out) / "index.json").is_file():
        return
    if name not in BUILTIN:
        raise FileNotFoundError(f"no MDS data at {out!r} (no index.json) and train.dataset={name!r} is not a built-in "
                                f"dataset to build there; build it with `megaflow data build NAME --out {out}` "
                                f"or set train.dataset to one of {BUILTIN}")
    ours = check_build_target(out, key)
    from data_pipeline.writers import build_dataset
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building %s/%s into %s (first run only)", name, split, out)
    build_dataset(name, tmp, split=split, limit=limit or None, seed=seed, mix=parse_mix(mix))
    (Path(tmp) / MARKER).write_text(f"built by megaflow: {name}/{split}\n")
    if ours:  # an earlier build of ours that lost its index.json: replaced whole
        shutil.rmtree(out)
    elif Path(out).is_dir():
        Path(out).rmdir()  # empty (checked above)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def check_build_target(out: str, key: str) -> bool:
    """Whether `out` holds an earlier megaflow build (to replace). An absent or empty directory is
    fine (False); anything else raises: megaflow never deletes what it did not write."""
    p = Path(out)
    if not p.exists():
        return False
    if not p.is_dir():
        raise ConfigError(f"{key}={out!r} is a file, not a dataset directory; point {key} at a directory")
    if (p / MARKER).is_file():
        return True
    entries = sorted(x.name for x in p.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ConfigError(f"{key}={out!r} holds files ({shown}) but no MDS index.json, and megaflow did not build it "
                          f"(no {MARKER}); it will not delete them to build the dataset there: point {key} at a new "
                          f"or empty directory")
    return False


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
