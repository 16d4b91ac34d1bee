"""Checkpoint directories: atomic, validated, the last K kept.

Layout of one checkpoint, `OUT/checkpoints/step_000123/`:
    model.pt       full (unsharded) model state dict, whatever the run's TP / PP / ZeRO layout
    optim.pt       optimizer state (one process); multi-process runs: optim.ppP_tpT.pt per
                   tensor/pipeline coordinate, or zero/ for ZeRO (see parallel/checkpoint.py)
    trainer.pt     step, loader state, RNG states, metrics history
    config.json    the run's config
    tokenizer.*    the tokenizer the run used (so a checkpoint generates on its own)
    meta.json      format version, step, file list with byte sizes; written LAST

A checkpoint is written into `.tmp-step_000123` and renamed into place only when complete, so a
crash or kill during a save leaves the previous checkpoints untouched and loadable; a directory
without a valid meta.json is never picked for resume. `latest` is a text file replaced atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], keep_last: int = 2,
                    extra_meta: Optional[dict] = None) -> Path:
    """Create `root/step_XXXXXX` atomically. `write(tmpdir)` writes the files; meta.json is added
    last, then the directory is renamed into place and old checkpoints beyond `keep_last` removed.
    Several processes writing one checkpoint: parallel/checkpoint.py (begin on one, write on all,
    commit on one, with barriers between)."""
    tmp = begin_checkpoint(root, step)
    write(tmp)
    return commit_checkpoint(root, tmp, step, keep_last, extra_meta)


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """A fresh, empty temporary directory for checkpoint `step`, named after this process (so a
    later save can tell a dead writer's leftovers, see `prune`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: str | Path, tmp: Path, step: int, keep_last: int = 2,
                      extra_meta: Optional[dict] = None) -> Path:
    """meta.json (every file under `tmp`, sub-directories included, with its size) written last,
    then the atomic rename to `root/step_XXXXXX`, `latest`, and pruning."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    meta = {"format": FORMAT, "step": step, "time": time.time(), "files": files, **(extra_meta or {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
        old = root / f".old-step_{step:06d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(root)
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # leftovers of a crashed save by a dead process
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def validate(path: Path) -> dict:
    """meta.json of a complete checkpoint, or a CheckpointError saying what is wrong."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a directory)")
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no meta.json (a save was interrupted?); "
                              f"use an earlier checkpoint in {str(path.parent)!r}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: meta.json is corrupt ({e})") from e
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}; it cannot be loaded")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {str(path)!r}: {name} has {f.stat().st_size} bytes, meta.json says "
                                  f"{size}: the file is truncated or corrupt")
    return meta


def list_checkpoints(root: str | Path) -> list:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def find_latest(root: str | Path) -> Optional[Path]:
    """Newest checkpoint under root that validates (skipping incomplete or corrupt ones)."""
    for path in reversed(list_checkpoints(root)):
        try:
            validate(path)
            return path
        except CheckpointError:
            continue
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory given either itself, a run's out_dir, or its checkpoints/ folder."""
    p = Path(path)
    if (p / "meta.json").exists() or p.name.startswith("step_"):
        validate(p)
        return p
    for root in (p / "checkpoints", p):
        latest = find_latest(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"no complete checkpoint found at {str(p)!r} (looked for step_*/meta.json there and in "
                          f"{str(p / 'checkpoints')!r})")


def load_file(path: Path, name: str, map_location="cpu"):
    try:
        return torch.load(path / name, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt zip files
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {name}: {e}") from e
