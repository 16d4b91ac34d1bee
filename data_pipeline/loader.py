"""The reader: MDS shards -> StreamingDataset -> decode + tokenize -> packed (B, T) batches.

Data-parallel view. Only the data-parallel rank and size decide what a process reads: Streaming is
told that there are `dp_size` nodes of one rank each and that this process is node `dp_rank`
(its own World, not the RANK/WORLD_SIZE environment and not torch.distributed), so tensor- and
pipeline-parallel peers that pass the same dp_rank read identical batches, and Streaming never calls
a torch.distributed collective. Each process is its own "local leader" with its own shared-memory
prefix; `_PREFIX_LOCK` serialises the prefix registration between processes of one host.

Resumption. Each rank consumes exactly `samples_per_batch` (S) samples per batch, so after k batches
the ranks have together consumed the first k * S * dp_size samples of Streaming's global order
(Streaming deals that order to nodes one sample at a time). The loader's state is that one number
plus the epoch: identical on every rank, and valid for a different dp size when
num_canonical_nodes is kept (Streaming's elastic determinism).

This file does not know the model; the batch layout is documented in docs/DATA.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict
from typing import Iterator

import torch
import xxhash
from filelock import FileLock
from torch.utils.data import DataLoader, IterableDataset

from data_pipeline import streaming_compat as sc
from data_pipeline.config import DataConfig
from data_pipeline.packing import PackStats, TokenizedDoc, pack_documents, tokenize_document
from data_pipeline.schema import BadSampleError, decode_sample
from data_pipeline.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_PREFIX_LOCK = os.path.join(tempfile.gettempdir(), "megaflow_streaming_prefix.lock")
_SHM_DIR = "/dev/shm"
_SHM_NAME = re.compile(r"^(\d{6})_(%s)$" % "|".join(sc.SHM_TO_CLEAN))
_STATE_VERSION = 1


# -- stale shared memory ----------------------------------------------------------------------
def _mapped_shm_names() -> set[str]:
    """Names under /dev/shm that some live process has mapped (from /proc/*/maps)."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    at = line.find("/dev/shm/")
                    if at >= 0:
                        names.add(line[at + 9 :].split()[0])
        except OSError:  # process gone, or another user's (its segments are not ours to remove)
            continue
    return names


def clean_stale_shared_memory() -> list[str]:
    """Remove Streaming's /dev/shm segments and /tmp filelocks that no live process uses.

    A segment is stale when it has Streaming's name pattern (`NNNNNN_locals`, `..._barrier`, ...),
    belongs to our user, and no running process maps it (checked in /proc/*/maps). Unlike
    `streaming.base.util.clean_stale_shared_memory()`, this never unlinks a segment that another
    live loader on this host is using and does not stop at the first free prefix. Returns what it
    removed. Call it holding `_PREFIX_LOCK` (build_loader does).
    """
    if not os.path.isdir(_SHM_DIR) or not os.path.isdir("/proc"):
        return []
    in_use, removed, live_prefixes = _mapped_shm_names(), [], set()
    for name in sorted(os.listdir(_SHM_DIR)):
        match = _SHM_NAME.match(name)
        if not match:
            continue
        path = os.path.join(_SHM_DIR, name)
        try:
            mine = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if name in in_use or not mine:
            live_prefixes.add(match.group(1))
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(path)
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        for suffix in (sc.BARRIER_FILELOCK, sc.CACHE_FILELOCK):
            if name.endswith("_" + suffix) and name[:6].isdigit() and name[:6] not in live_prefixes:
                path = os.path.join(tmp, name)
                with contextlib.suppress(OSError):
                    if os.stat(path).st_uid == os.getuid():
                        os.unlink(path)
                        removed.append(path)
    if removed:
        log.warning("removed %d stale Streaming shared-memory/lock files: %s", len(removed), removed)
    return removed


# -- index and shard checks -------------------------------------------------------------------
def check_shards(data_dir: str, validate_hashes: bool = False) -> dict:
    """Check index.json against the shard files before Streaming opens them; returns the index.

    Raises FileNotFoundError (missing index or shard) or BadSampleError (index.json not matching a
    shard: size, sample count in the shard header, or hash), naming the file.
    """
    index_path = os.path.join(data_dir, "index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"no index.json in {data_dir}; build the data with `python -m data_pipeline build`")
    try:
        with open(index_path) as f:
            index = json.load(f)
        shards = index["shards"]
    except (ValueError, KeyError) as err:
        raise BadSampleError(f"{index_path} is not a valid MDS index ({err}); rebuild the dataset") from None
    for shard_index, info in enumerate(shards):
        raw = info.get("raw_data") or {}
        name = raw.get("basename", f"<shard {shard_index}>")
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            zipped = info.get("zip_data") or {}
            if zipped and os.path.isfile(os.path.join(data_dir, zipped["basename"])):
                continue  # Streaming decompresses it on first use
            raise FileNotFoundError(
                f"missing shard: {name} (shard {shard_index}, {info.get('samples')} samples) is listed "
                f"in {index_path} but {path} does not exist; restore it or rebuild the dataset")
        size = os.path.getsize(path)
        if size != raw.get("bytes"):
            raise BadSampleError(
                f"index.json does not match its shards: {index_path} says {name} (shard {shard_index}) "
                f"has {raw.get('bytes')} bytes, the file has {size}; the shard is truncated/replaced or "
                "the index is stale. Rebuild the dataset or restore the matching index.json")
        if info.get("format") == "mds":
            with open(path, "rb") as f:
                header_samples = int.from_bytes(f.read(4), "little")
            if header_samples != info.get("samples"):
                raise BadSampleError(
                    f"index.json does not match its shards: {index_path} says {name} (shard "
                    f"{shard_index}) has {info.get('samples')} samples, its header says {header_samples}")
        if validate_hashes:
            expected = raw.get("hashes", {}).get("xxh64")
            if expected is None:
                raise BadSampleError(f"{index_path}: {name} has no xxh64 hash; set validate_hashes=False")
            with open(path, "rb") as f:
                actual = xxhash.xxh64(f.read()).hexdigest()
            if actual != expected:
                raise BadSampleError(f"corrupt shard: {name} (shard {shard_index}) xxh64 {actual} != "
                                     f"{expected} recorded in {index_path}")
    return index


# -- Streaming with a data-parallel world -----------------------------------------------------
class _NoDist:
    """Stands in for torch.distributed inside Streaming while it builds: no collectives."""

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def is_initialized() -> bool:
        return False


@contextlib.contextmanager
def _data_parallel_world(dp_rank: int, dp_size: int):
    """Make StreamingDataset.__init__ see dp_size nodes of one rank, this process being dp_rank."""
    import streaming.base.dataset as sd
    import streaming.base.shared.prefix as sp

    world = sc.World(num_nodes=dp_size, ranks_per_node=1, workers_per_rank=1, worker=dp_rank)

    class _DataParallelWorld(sc.World):
        @classmethod
        def detect(cls):
            return world.copy()

    saved = sd.World, sd.maybe_init_dist, sd.dist, sp.dist
    sd.World, sd.maybe_init_dist, sd.dist, sp.dist = _DataParallelWorld, (lambda: False), _NoDist, _NoDist
    try:
        yield
    finally:
        sd.World, sd.maybe_init_dist, sd.dist, sp.dist = saved


class _RankDataset(sc.StreamingDataset):
    """StreamingDataset whose items carry their sample id, or say where and why they failed."""

    def where(self, sample_id: int) -> str:
        shard_id, index = self.spanner[sample_id]
        shard = self.shards[shard_id]
        name = shard.file_pairs[0][0].basename if shard.file_pairs[0][0] else f"shard {shard_id}"
        return f"{os.path.join(shard.dirname, shard.split, name)} (shard {shard_id}) sample {index} (global sample {sample_id})"

    def __getitem__(self, sample_id: int) -> dict:
        try:
            sample = dict(self.get_item(sample_id))
        except Exception as err:  # corrupt bytes surface as many exception types
            return {"__error__": f"{type(err).__name__}: {err}", "__sample_id__": sample_id}
        sample["__sample_id__"] = sample_id
        return sample

    def on_exception(self, future) -> None:
        # Streaming re-raises a download-thread error inside a future callback, where nobody sees
        # it, and its epoch then ends early and silently. Keep it so the loader can raise it.
        error = future.exception()
        if error is not None:
            self.thread_error = error
            self._event.set()


class PackedBatches(IterableDataset):
    """Per rank (and per DataLoader worker): S samples -> one packed batch, plus bookkeeping."""

    def __init__(self, dataset: _RankDataset, cfg: DataConfig, tokenizer: Tokenizer) -> None:
        self.dataset, self.cfg, self.tokenizer = dataset, cfg, tokenizer
        self.skipped = self.overflow_batches = 0

    def _document(self, sample: dict) -> TokenizedDoc | None:
        sample_id = sample["__sample_id__"]
        error = sample.get("__error__")
        segments = None
        if error is None:
            try:
                segments = decode_sample(sample, self.cfg)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        if error is not None:
            message = f"bad sample: {self.dataset.where(sample_id)}: {error}"
            if not self.cfg.skip_bad_samples:
                raise BadSampleError(message + " (set skip_bad_samples=True to skip such samples)")
            self.skipped += 1
            log.warning("skipped %s [%d skipped so far by this reader]", message, self.skipped)
            return None
        source = self.dataset.where(sample_id)
        return tokenize_document(segments, self.tokenizer, self.cfg.image_tokens, source)

    def _pack(self, docs: list, sample_ids: list[int], skipped: int) -> tuple[dict, dict]:
        batch, stats = pack_documents(docs, self.cfg, self.tokenizer)
        if stats.overflow_docs:
            self.overflow_batches += 1
            if math.log10(self.overflow_batches).is_integer():  # the 1st, 10th, 100th...: totals are in stats
                log.warning("batch overflow: %d documents (%d tokens) did not fit in %d rows of %d and "
                            "were dropped, e.g. %s; %d batches of this reader overflowed so far (reported "
                            "again at 10x that; loader.stats and the run's result.json have the totals); "
                            "lower samples_per_batch or raise batch_size/seq_len", stats.overflow_docs,
                            stats.overflow_tokens, self.cfg.batch_size, self.cfg.seq_len,
                            stats.overflow_sources[0], self.overflow_batches)
        stats.overflow_sources = []
        return batch, {"samples": len(sample_ids), "sample_ids": sample_ids, "skipped": skipped,
                       "stats": asdict(stats)}

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        S = self.cfg.samples_per_batch
        docs, sample_ids, skipped_before = [], [], self.skipped
        try:
            for sample in self.dataset:
                sample_ids.append(int(sample["__sample_id__"]))
                doc = self._document(sample)
                if doc is not None:
                    docs.append(doc)
                if len(sample_ids) == S:
                    yield self._pack(docs, sample_ids, self.skipped - skipped_before)
                    docs, sample_ids, skipped_before = [], [], self.skipped
            error = getattr(self.dataset, "thread_error", None)
            if error is not None:
                raise BadSampleError(f"Streaming could not prepare a shard: {type(error).__name__}: {error}") from error
            if sample_ids:  # the epoch's last, partial batch
                yield self._pack(docs, sample_ids, self.skipped - skipped_before)
        finally:
            iterator = getattr(self.dataset, "_iterator", None)
            if iterator is not None:
                iterator.exit()  # stop Streaming's prefetch threads when abandoned mid-epoch


class Loader:
    """Iterable over the rest of the current epoch's batches, with an exact, elastic state_dict.

    `for batch in loader` yields batch dicts (docs/DATA.md); iterating again starts the next
    epoch. `state_dict()` is the same on every data-parallel rank; `load_state_dict()` accepts one
    saved under any dp size whose relation to num_canonical_nodes is valid (see check in __init__).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        nodes = cfg.num_canonical_nodes
        if max(nodes, dp_size) % min(nodes, dp_size):
            raise ValueError(f"num_canonical_nodes={nodes} and dp_size={dp_size}: one must divide the "
                             "other (Streaming's elastic determinism); keep num_canonical_nodes fixed "
                             "across resumes and pick it divisible by every dp size you use")
        if not cfg.local:
            raise ValueError("DataConfig.local is empty: set it to the MDS directory (or the cache dir with remote)")
        self.cfg, self.tokenizer, self.dp_rank, self.dp_size = cfg, tokenizer, dp_rank, dp_size
        local = cfg.local
        if cfg.remote is None:
            check_shards(os.path.join(local, cfg.split or ""), cfg.validate_hashes)
        else:  # one cache per process of a host: Streaming's caches cannot be shared across prefixes
            local = os.path.join(local, f"local_rank{os.environ.get('LOCAL_RANK', '0')}")
        with FileLock(_PREFIX_LOCK, timeout=cfg.timeout_s), _data_parallel_world(dp_rank, dp_size):
            clean_stale_shared_memory()
            self.dataset = _RankDataset(
                remote=cfg.remote, local=local, split=cfg.split, shuffle=cfg.shuffle,
                shuffle_seed=cfg.seed, num_canonical_nodes=nodes, batch_size=cfg.samples_per_batch,
                partition_algo="orig", download_timeout=cfg.timeout_s,
                validate_hash="xxh64" if (cfg.validate_hashes and cfg.remote) else None,
                # Local shards need no download; a long lookahead lets Streaming's threads finish.
                predownload=(1 << 30) if cfg.remote is None else 8 * cfg.samples_per_batch)
        self.packed = PackedBatches(self.dataset, cfg, tokenizer)
        self.epoch, self.sample_in_epoch = 0, 0
        self.stats = {"batches": 0, "samples": 0, "skipped": 0, **asdict(PackStats())}
        del self.stats["overflow_sources"]
        self.last_sample_ids: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in a whole epoch (all ranks get the same count)."""
        per_rank = math.ceil(self.dataset.epoch_size / self.dp_size)
        return math.ceil(per_rank / self.cfg.samples_per_batch)

    def __iter__(self) -> Iterator[dict]:
        # Streaming writes the resume point into a new `_resume` segment on every load_state_dict;
        # one made by an earlier pass is released first, else the new one only attaches to it and
        # the old one, unlinked later without telling Python's resource tracker, is reported as
        # leaked at exit.
        old = getattr(self.dataset, "_resume_shm", None)
        if old is not None:
            with contextlib.suppress(Exception):
                old.cleanup()
        self.dataset.load_state_dict(self._streaming_state())
        loader = DataLoader(self.packed, batch_size=None, num_workers=self.cfg.num_workers,
                            timeout=self.cfg.timeout_s if self.cfg.num_workers else 0)
        step = self.cfg.samples_per_batch * self.dp_size
        for batch, info in loader:
            self.sample_in_epoch += step
            self.last_sample_ids = info["sample_ids"]
            self.stats["batches"] += 1
            self.stats["samples"] += info["samples"]
            self.stats["skipped"] += info["skipped"]
            for key, value in info["stats"].items():
                if key in self.stats:
                    self.stats[key] += value
            yield batch
        self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    def _streaming_state(self) -> dict:
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                "num_canonical_nodes": self.cfg.num_canonical_nodes, "shuffle_seed": self.cfg.seed,
                "initial_physical_nodes": None}

    def state_dict(self) -> dict:
        """Where the data stands: epoch and samples consumed by all ranks together this epoch."""
        return {"version": _STATE_VERSION, "epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                "num_canonical_nodes": self.cfg.num_canonical_nodes, "seed": self.cfg.seed,
                "dp_size": self.dp_size, "samples_per_batch": self.cfg.samples_per_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from any rank, any dp size); call before iterating."""
        for key in ("num_canonical_nodes", "seed"):
            ours = self.cfg.num_canonical_nodes if key == "num_canonical_nodes" else self.cfg.seed
            if state[key] != ours:
                raise ValueError(f"cannot resume exactly: the state has {key}={state[key]}, this config "
                                 f"{ours}; the global sample order depends on it, keep it unchanged")
        if state["sample_in_epoch"] % self.dp_size:
            log.warning("resume point %d is not a multiple of dp_size=%d; Streaming rounds it down, so "
                        "up to %d samples are seen twice", state["sample_in_epoch"], self.dp_size, self.dp_size - 1)
        self.epoch, self.sample_in_epoch = int(state["epoch"]), int(state["sample_in_epoch"])

    def close(self) -> None:
        """Release this loader's shared memory and lock files now (also done at process exit)."""
        dataset = getattr(self, "dataset", None)
        if dataset is None:
            return
        iterator = getattr(dataset, "_iterator", None)
        if iterator is not None:
            iterator.exit()
        holders = [dataset._locals_shm, dataset._next_epoch.arr.shm, dataset._cache_usage.arr.shm,
                   dataset._shard_states.shm, dataset._shard_access_times.shm,
                   dataset._shared_barrier._arr.shm, getattr(dataset, "_resume_shm", None)]
        for shm in holders:
            if shm is not None:
                with contextlib.suppress(Exception):
                    shm.cleanup()
        prefix = f"{dataset._shm_prefix_int:06}_"
        for name in sc.SHM_TO_CLEAN:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(_SHM_DIR, prefix + name))
        for name in (sc.BARRIER_FILELOCK, sc.CACHE_FILELOCK):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(tempfile.gettempdir(), prefix + name))
        self.dataset = None

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_loader(cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1) -> Loader:
    """The training data of data-parallel rank `dp_rank` of `dp_size` (see Loader)."""
    return Loader(cfg, tokenizer, dp_rank, dp_size)


def describe_batch(batch: dict) -> dict:
    """Shapes and dtypes of a batch, for logs."""
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in batch.items() if torch.is_tensor(v)}
