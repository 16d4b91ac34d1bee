"""Checkpoint directories: atomic, checksummed, validated, the last K kept.

Layout of one checkpoint, `OUT/checkpoints/step_000123/`:
    model.pt       full (unsharded) model state dict, whatever the run's TP / PP / ZeRO layout
    optim.pt       optimizer state (one process); multi-process runs: optim.ppP_tpT.pt per
                   tensor/pipeline coordinate, or zero/ for ZeRO (see parallel/checkpoint.py)
    trainer.pt     step, loader state, RNG states, metrics history
    config.json    the run's config
    tokenizer.*    the tokenizer the run used (so a checkpoint generates on its own)
    meta.json      format version, step, every file with its byte size and xxh3-128 checksum;
                   written LAST

Guarantees:
  - atomic: a checkpoint is written into `.tmp-step_000123-PID` and renamed into place only when
    complete, so a crash or kill during a save leaves the previous checkpoints untouched and
    loadable; a directory without a valid meta.json is never picked for resume. `latest` is a text
    file replaced atomically. A failed write (disk full) removes its temporary directory and raises
    a CheckpointError naming the directory; the older checkpoints stay.
  - verified: `validate` checks every file's size and checksum; `load_file` checks the checksum of
    the file it reads and that every floating-point tensor in it is finite. Checkpoints of format 1
    (sizes only, no checksums) still load.
  - no checkpoint vanishes under a reader: a reader (`load_retrying`) leases the checkpoint it
    loads with a `.reading-step_N-HOST-PID` file, and pruning skips leased checkpoints and the one
    `latest` named before the commit (a reader that resolved it a moment ago may not have leased it
    yet); pruned checkpoints are renamed away before deletion, so a reader sees a whole checkpoint or
    none; if one vanished between resolving and leasing anyway, the reader resolves once more.
  - leftovers of dead processes (`.tmp-step_*`, `.del-*`, `.latest.tmpPID`, readers' leases) are
    removed by the next save.
Not here: the multi-process protocol (parallel/checkpoint.py) and what goes into the files (train.py).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import xxhash

FORMAT = 2  # 1: sizes only; 2: sizes and checksums
HASH = "xxh3_128"  # xxhash (already a dependency of the data pipeline): ~10x faster than sha256 on CPU
_CHUNK = 1 << 24
_STALE_TEXT = re.compile(r"^\..+\.tmp(\d+)$")  # atomic_write_text's `.latest.tmp<pid>`
_LEASE = re.compile(r"^\.reading-(step_\d+)-(.+)-(\d+)$")  # a reader's `.reading-step_N-HOST-PID`
LEASE_HOURS = 6  # a lease from another host (its pid cannot be checked here) expires after this
log = logging.getLogger("megaflow")


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


def file_digest(path: Path) -> str:
    """xxh3-128 hex digest of a file, read in 16 MiB chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    """Flush a file's data to disk before the commit: a power loss must not leave `latest` naming
    torn files after older checkpoints were pruned."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


# ----- writing --------------------------------------------------------------------------------------
def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], keep_last: int = 2,
                    extra_meta: Optional[dict] = None) -> Path:
    """Create `root/step_XXXXXX` atomically. `write(tmpdir)` writes the files; meta.json is added
    last, then the directory is renamed into place and old checkpoints beyond `keep_last` removed.
    Several processes writing one checkpoint: parallel/checkpoint.py (begin on one, write on all,
    commit on one, with barriers between)."""
    tmp = begin_checkpoint(root, step)
    try:
        write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save on a full disk: RuntimeError "... unexpected pos"
        raise write_failed(root, tmp, step, e) from e
    return commit_checkpoint(root, tmp, step, keep_last, extra_meta)


def write_failed(root: str | Path, tmp: Path, step: int, error: BaseException) -> CheckpointError:
    """Remove the unfinished `tmp` and say what happened (a full disk, mostly) and what is intact."""
    root = Path(root)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        free = f"{shutil.disk_usage(root).free / 2 ** 20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = [p.name for p in list_checkpoints(root)]
    return CheckpointError(f"cannot write checkpoint step_{step:06d} into {str(root)!r} ({free}): "
                           f"{type(error).__name__}: {str(error).strip()[:300]}; free disk space (or lower "
                           f"train.keep_last) and continue with --resume; the earlier checkpoints are intact: "
                           f"{', '.join(kept) or 'none'}")


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
                      extra_meta: Optional[dict] = None, known_sums: Optional[dict] = None) -> Path:
    """meta.json (every file under `tmp`, sub-directories included, with its size and checksum)
    written last, then the atomic rename to `root/step_XXXXXX`, `latest`, and pruning.
    `known_sums`: {relative path: checksum} of files their writers hashed as they wrote them (the
    sharded state's files); only the other files are read here to hash them."""
    root = Path(root)
    final = root / f"step_{step:06d}"
    known = known_sums or {}
    try:
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
        sums = {k: known[k] if k in known else file_digest(tmp / k) for k in files}
        for k in files:  # sharded files were fsync'd by their writers
            if k not in known:
                _fsync_file(tmp / k)
        meta = {"format": FORMAT, "step": step, "time": time.time(), "files": files, "hash": HASH,
                "checksums": sums, **(extra_meta or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except OSError as e:
        raise write_failed(root, tmp, step, e) from e
    _fsync_dir(tmp)
    before = read_latest(root)
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
        old = root / f".old-step_{step:06d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    prune(root, keep_last, keep=[before] if before else [])
    return final


def read_latest(root: Path) -> Optional[str]:
    """The checkpoint name in `root/latest`, or None."""
    try:
        name = (root / "latest").read_text().strip()
    except OSError:
        return None
    return name if name.startswith("step_") else None


def prune(root: Path, keep_last: int, keep: Iterable[str] = ()) -> None:
    """Remove checkpoints beyond the newest `keep_last` (0 = keep all) except those named in `keep`,
    and the leftovers of dead processes. A checkpoint is renamed away before it is deleted, so a
    reader never finds one half-deleted."""
    keep = set(keep) | live_leases(root)
    ckpts = list_checkpoints(root)
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        if old.name in keep:
            continue
        gone = root / f".del-{old.name}-{os.getpid()}"
        try:
            os.replace(old, gone)
        except OSError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
    for stale in [*root.glob(".tmp-step_*"), *root.glob(".del-step_*"), *root.glob(".old-step_*")]:
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):  # a dead process's save or prune
            shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".*.tmp*"):
        m = _STALE_TEXT.match(stale.name)
        if m and stale.is_file() and not _pid_alive(m.group(1)):
            stale.unlink(missing_ok=True)


def live_leases(root: Path) -> set:
    """Names of the checkpoints that live readers hold (see `reading`); dead readers' leases go."""
    held, host = set(), socket.gethostname()
    for f in root.glob(".reading-*"):
        m = _LEASE.match(f.name)
        if not m:
            continue
        try:
            if m.group(2) == host:
                alive = _pid_alive(m.group(3))
            else:
                alive = time.time() - f.stat().st_mtime < LEASE_HOURS * 3600
        except OSError:
            continue
        if alive:
            held.add(m.group(1))
        else:
            f.unlink(missing_ok=True)
    return held


@contextmanager
def reading(ckpt: Path):
    """Lease checkpoint `ckpt` while reading it: pruning in a running save skips it. Without write
    access to its folder (someone else's run) the read goes on unleased."""
    lease = ckpt.parent / f".reading-{ckpt.name}-{socket.gethostname()}-{os.getpid()}"
    try:
        lease.touch()
    except OSError:
        lease = None
    try:
        yield
    finally:
        if lease is not None:
            lease.unlink(missing_ok=True)


# ----- reading --------------------------------------------------------------------------------------
def read_meta(path: Path) -> dict:
    """meta.json of checkpoint `path` (no file checks), or a CheckpointError."""
    meta_file = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a directory)")
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: no meta.json (a save was interrupted?); "
                              f"use an earlier checkpoint in {str(path.parent)!r}")
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist any more (removed while reading)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: meta.json is corrupt ({e})") from e


def check_file(path: Path, name: str, meta: dict) -> None:
    """The size and checksum of file `name` against meta.json, or a CheckpointError naming it."""
    f = path / name
    size = meta.get("files", {}).get(name)
    if size is None:
        return
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is missing {name}; it cannot be loaded")
    if f.stat().st_size != size:
        raise CheckpointError(f"checkpoint {str(path)!r}: {name} has {f.stat().st_size} bytes, meta.json says "
                              f"{size}: the file is truncated or corrupt")
    want = meta.get("checksums", {}).get(name)
    if want is None:  # format 1
        return
    try:
        got = file_digest(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {name} was removed while reading it") from e
    if got != want:
        raise CheckpointError(f"checkpoint {str(path)!r}: {name} is corrupt, its content changed after the save "
                              f"({HASH} {got}, meta.json says {want}); cannot read {name}: use an earlier "
                              f"checkpoint")


def validate(path: Path) -> dict:
    """meta.json of a complete, intact checkpoint (every file's size and checksum checked), or a
    CheckpointError saying what is wrong."""
    meta = read_meta(path)
    for name in meta.get("files", {}):
        check_file(path, name, meta)
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
        except CheckpointError as e:
            if (path / "meta.json").is_file():  # complete once, damaged since: say so (an interrupted save is normal)
                log.warning("skipping checkpoint %s: %s", path, e)
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


def load_retrying(path: str | Path, load: Callable[[Path], object]):
    """`load(resolve(path))` with the checkpoint leased (`reading`), so a running save does not prune
    it meanwhile; if it vanished before the lease took hold, resolve and load once more. Other
    failures are raised as they are."""
    for attempt in (1, 2):
        ckpt = None
        try:
            ckpt = resolve(path)
            with reading(ckpt):
                if not (ckpt / "meta.json").is_file():
                    raise CheckpointError(f"checkpoint {str(ckpt)!r} was removed before it could be read")
                return load(ckpt)
        except (CheckpointError, OSError):
            if attempt == 2 or (ckpt is not None and ckpt.is_dir()):
                raise
            log.info("checkpoint %s disappeared before it was read (a save pruned it); resolving again", ckpt)


def nonfinite(obj, prefix: str = "") -> Optional[str]:
    """The name of the first floating-point tensor in `obj` (nested dicts / lists) holding NaN or
    Inf, or None."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
            return prefix or "tensor"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def load_file(path: Path, name: str, map_location="cpu"):
    """torch.load of checkpoint file `name`, its checksum verified (meta.json) and every floating-point
    tensor in it checked to be finite; a CheckpointError naming the file otherwise."""
    if (path / "meta.json").is_file():
        check_file(path, name, read_meta(path))
    try:
        obj = torch.load(path / name, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt zip files
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read {name}: {e}") from e
    bad = nonfinite(obj)
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r}: {name} holds NaN or Inf values (in {bad!r}); it cannot "
                              f"be used: resume or generate from an earlier checkpoint")
    return obj
