"""The reader: MDS shards -> StreamingDataset -> decode + tokenize -> packed (B, T) batches.

Data-parallel view. Every process builds the same StreamingDataset, told it is one node of one
rank (its own World, not the RANK/WORLD_SIZE environment and not torch.distributed, so Streaming
never calls a collective), takes Streaming's global sample order of the epoch (fixed by seed,
shuffle and num_canonical_nodes, the same for any dp size) and reads samples by id. The packing
plan is global: every rank runs the same `Planner` over that order for dp_size x B rows per step
and materialises its own B rows, so ranks never overlap, tensor/pipeline peers that pass the same
dp_rank get identical batches, and no rank waits for another. Each process is its own "local
leader" with its own shared-memory prefix; `_PREFIX_LOCK` serialises the prefix registration.

Resumption. The state after step k is the planner's: (epoch, how many documents of the global order
were read, the pieces read but not yet placed). It is identical on every rank, a resumed run makes
exactly the steps of an uninterrupted one, and any dp size or batch size can continue it (every
document of the epoch is still placed exactly once). The state after an epoch's last step is the
start of the next epoch, so a checkpoint taken there resumes.

Workers. The planner runs in the training process (the DataLoader's sampler, lengths only: text is
tokenized, images are not decoded); DataLoader workers decode and build the planned rows
(`BatchBuilder`, stateless), and the state after each step travels with its batch, so prefetching
and any worker count give the same batches and states. With `data.prefetch` (by default on a CUDA
run, where the loader pins) a background thread of the training process iterates the DataLoader that
many batches ahead (data_pipeline/prefetch.py): the planner and, with `pin_memory`, the copy into
pinned memory run there, not between two training steps; `state_dict()` is still the state after the
last batch yielded.

This file does not know the model; the batch layout is documented in docs/DATA.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict
from typing import Iterator

import torch
import xxhash
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from data_pipeline import streaming_compat as sc
from data_pipeline.config import PACKINGS, DataConfig, resolve_packing
from data_pipeline.packing import PackStats, Planner, TokenizedDoc, build_batch, split_document, tokenize_document
from data_pipeline.prefetch import Prefetcher
from data_pipeline.schema import BadSampleError, decode_sample
from data_pipeline.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_PREFIX_LOCK = os.path.join(tempfile.gettempdir(), "megaflow_streaming_prefix.lock")
_SHM_DIR = "/dev/shm"
_SHM_NAME = re.compile(r"^(\d{6})_(%s)$" % "|".join(sc.SHM_TO_CLEAN))
_STATE_VERSION = 2


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
def _single_world():
    """Make StreamingDataset.__init__ see one node of one rank: every process reads by sample id
    from the same global order (the loader plans the data-parallel split itself)."""
    import streaming.base.dataset as sd
    import streaming.base.shared.prefix as sp

    world = sc.World(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)

    class _OneWorld(sc.World):
        @classmethod
        def detect(cls):
            return world.copy()

    saved = sd.World, sd.maybe_init_dist, sd.dist, sp.dist
    sd.World, sd.maybe_init_dist, sd.dist, sp.dist = _OneWorld, (lambda: False), _NoDist, _NoDist
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
        except FileNotFoundError as err:  # the shard could not be fetched: no sample of it can be read
            # (raise at once: Streaming leaves the shard marked as downloading and a retry would wait forever)
            raise BadSampleError(f"Streaming could not prepare a shard: {self.where(sample_id)}: {err}") from err
        except Exception as err:  # corrupt bytes surface as many exception types
            return {"__error__": f"{type(err).__name__}: {err}", "__sample_id__": sample_id}
        sample["__sample_id__"] = sample_id
        return sample


class BatchBuilder(Dataset):
    """Map-style: one rank's planned rows (an item of `_Plans`) -> (batch, info). Runs in the
    DataLoader workers; it holds no state between items, so any worker count gives the same batches."""

    def __init__(self, dataset: _RankDataset, cfg: DataConfig, tokenizer: Tokenizer) -> None:
        self.dataset, self.cfg, self.tokenizer = dataset, cfg, tokenizer
        self.skipped = 0

    def __len__(self) -> int:  # unused: items come from the plan, not from range(len)
        return 0

    def document(self, sample_id: int, images: bool = True) -> TokenizedDoc | None:
        """The tokenized document, or None for a bad sample when skip_bad_samples (else raise)."""
        sample = self.dataset[sample_id]
        error, segments = sample.get("__error__"), None
        if error is None:
            try:
                segments = decode_sample(sample, self.cfg, images=images)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        if error is not None:
            message = f"bad sample: {self.dataset.where(sample_id)}: {error}"
            if not self.cfg.skip_bad_samples:
                raise BadSampleError(message + " (set skip_bad_samples=True to skip such samples)")
            self.skipped += 1
            log.warning("skipped %s [%d skipped so far by this reader]", message, self.skipped)
            return None
        return tokenize_document(segments, self.tokenizer, self.cfg.image_tokens, self.dataset.where(sample_id))

    def __getitem__(self, plan: dict) -> tuple[dict, dict]:
        rows, sample_ids, stats = [], [], PackStats()
        # decode each document once (a long one's pieces may share a batch), in sample-id order so
        # that the first bad sample reported does not depend on where the planner put it
        wanted = sorted({p[0] for row in plan["rows"] for p in row if p[1] != p[2]})
        decoded = {sample_id: self.document(sample_id) for sample_id in wanted}
        stats.skipped += sum(doc is None for doc in decoded.values())
        for row in plan["rows"]:
            placed = []
            for sample_id, start, end, _ in row:
                sample_ids.append(sample_id)
                stats.samples += start == 0
                if start == end:  # the planner found this sample bad and skips it (it logged it)
                    stats.skipped += 1
                    continue
                doc = decoded[sample_id]
                if doc is not None:
                    stats.docs += start == 0
                    placed.append((doc, start, end))
            rows.append(placed)
        batch, built = build_batch(rows, self.cfg, self.tokenizer)
        for name in ("pieces", "dropped_docs", "text_tokens", "image_slots", "slots"):
            setattr(stats, name, getattr(built, name))
        if stats.dropped_docs:
            log.error("%d planned document pieces did not fit their row and were dropped (a packing bug; "
                      "please report it with this config)", stats.dropped_docs)
        return batch, {"sample_ids": sample_ids, "state": plan["state"], "stats": asdict(stats)}


class _Plans:
    """The DataLoader's sampler: iterated in the training process, it runs the global `Planner`
    (every rank runs the same one) and yields this rank's rows of each step with the loader state
    after that step, which travels with the batch through the workers (prefetch-safe)."""

    def __init__(self, planner: Planner, epoch: int, dp_rank: int, batch_size: int) -> None:
        self.planner, self.epoch, self.dp_rank, self.batch_size = planner, epoch, dp_rank, batch_size

    def __iter__(self) -> Iterator[dict]:
        lo = self.dp_rank * self.batch_size
        while (rows := self.planner.step()) is not None:
            if self.planner.done:  # the epoch's last step: the state after it is the next epoch's start
                state = (self.epoch + 1, 0, [])
            else:
                state = (self.epoch, *self.planner.state())
            yield {"rows": rows[lo : lo + self.batch_size], "state": state}


def _as_is(item):
    return item


def _pinned(item: tuple) -> tuple:
    """(batch, info) with the batch's tensors in pinned memory: its host-to-device copies then neither
    stage it nor wait (megaflow.train.host_to_device leaves a pinned tensor as it is)."""
    batch, info = item
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}, info


class Loader:
    """Iterable over the rest of the current epoch's batches, with an exact, elastic state_dict.

    `for batch in loader` yields batch dicts (docs/DATA.md); iterating again starts the next
    epoch. `state_dict()` is the same on every data-parallel rank; `load_state_dict()` accepts one
    saved under any dp size and batch size (the plan is global; see docs/DATA.md, Resumption).
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int,
                 pin_memory: bool = False) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if not cfg.local:
            raise ValueError("DataConfig.local is empty: set it to the MDS directory (or the cache dir with remote)")
        self.cfg, self.tokenizer, self.dp_rank, self.dp_size = cfg, tokenizer, dp_rank, dp_size
        self.pin_memory, self._prefetcher = pin_memory, None
        local = cfg.local
        if cfg.remote is None:
            check_shards(os.path.join(local, cfg.split or ""), cfg.validate_hashes)
        else:  # one cache per process of a host: Streaming's caches cannot be shared across prefixes
            local = os.path.join(local, f"local_rank{os.environ.get('LOCAL_RANK', '0')}")
        nodes = cfg.num_canonical_nodes
        with FileLock(_PREFIX_LOCK, timeout=cfg.timeout_s), _single_world():
            clean_stale_shared_memory()
            self.dataset = _RankDataset(
                remote=cfg.remote, local=local, split=cfg.split, shuffle=cfg.shuffle,
                shuffle_seed=cfg.seed, num_canonical_nodes=nodes, batch_size=1,
                shuffle_block_size=max(4_000_000 // nodes, 1 << 18),  # Streaming's own default
                partition_algo="orig", download_timeout=cfg.timeout_s,
                validate_hash="xxh64" if (cfg.validate_hashes and cfg.remote) else None)
        self.builder = BatchBuilder(self.dataset, cfg, tokenizer)
        self.epoch, self.next_index, self.carry = 0, 0, []
        # data.packing resolved for this run's dp x B rows; a resumed run's is its loader state's (load_state_dict)
        self.packing = resolve_packing(cfg.packing, self.dp_size * cfg.batch_size)
        self._pieces: dict[int, list] = {}  # sample id -> its pieces (lengths only), kept across epochs
        self.stats = {"batches": 0, **asdict(PackStats())}
        self.last_sample_ids: list[int] = []

    # -- the plan ----------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        """Streaming's global sample order of `epoch` (seed, shuffle, num_canonical_nodes): the same
        for every dp size, because Streaming is always told one node of one rank."""
        world = sc.World(num_nodes=1, ranks_per_node=1, workers_per_rank=1, worker=0)
        work = sc.generate_work("random", self.dataset, world, epoch, 0)
        ids = work.flatten()
        return ids[ids >= 0].tolist()

    def _measure(self, sample_id: int) -> list:
        """A document's pieces (sample_id, start, end, n_images) from its text and image count."""
        pieces = self._pieces.get(sample_id)
        if pieces is None:
            pieces = self._one_piece(sample_id) or self._split(sample_id)
            self._pieces[sample_id] = pieces
        return pieces

    def _one_piece(self, sample_id: int) -> list | None:
        """The common case, fast: a well-formed document that fits one row whole. None otherwise
        (then `_split` checks it properly; images are checked when the batch is built)."""
        cfg = self.cfg
        sample = self.dataset[sample_id]
        try:
            segments, length, n_images = sample["segments"], 2, 0  # bos, eos
            for seg in segments:
                if seg["kind"] == "text":
                    length += len(self.tokenizer.encode(str(seg["text"])))
                elif seg["kind"] == "image":
                    n_images += 1
                    length += cfg.image_tokens + 2
                else:
                    return None
        except Exception:  # malformed: `_split` reports it properly
            return None
        if "__error__" in sample or not segments or length > cfg.seq_len or n_images > cfg.max_images:
            return None
        return [(sample_id, 0, length, n_images)]

    def _split(self, sample_id: int) -> list:
        doc = self.builder.document(sample_id, images=False)
        if doc is None:  # bad and skipped: one empty piece, so it is still counted as read
            return [(sample_id, 0, 0, 0)]
        cfg = self.cfg
        return [(sample_id, start, end, sum(1 for s in doc.image_starts if start <= s < end))
                for start, end in split_document(doc, cfg.seq_len, cfg.max_images, cfg.image_tokens)]

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        planner = Planner(self.epoch_order(self.epoch), self._measure, self.dp_size * cfg.batch_size,
                          cfg.seq_len, cfg.max_images, cfg.lookahead, self.next_index, self.carry, self.packing)
        if planner.done:  # nothing left of this epoch (an empty dataset): move on
            self.epoch, self.next_index, self.carry = self.epoch + 1, 0, []
            return
        loader = DataLoader(self.builder, batch_size=None, collate_fn=_as_is,
                            sampler=_Plans(planner, self.epoch, self.dp_rank, cfg.batch_size),
                            num_workers=cfg.num_workers, timeout=cfg.timeout_s if cfg.num_workers else 0)
        items, depth = loader, cfg.prefetch if cfg.prefetch >= 0 else 2 * self.pin_memory  # -1: auto
        if depth:  # plan, build (or receive from the workers) and pin ahead, in a thread
            self._close_prefetch()
            items = self._prefetcher = Prefetcher(loader, depth, _pinned if self.pin_memory else None)
        try:
            for batch, info in items:
                self.epoch, self.next_index, self.carry = info["state"]
                self.last_sample_ids = info["sample_ids"]
                self.stats["batches"] += 1
                for key, value in info["stats"].items():
                    self.stats[key] += value
                yield batch
        finally:
            if items is self._prefetcher:
                self._close_prefetch()

    def _close_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def state_dict(self) -> dict:
        """Where the data stands (identical on every rank): the epoch, how far into its global
        order documents were read, and the pieces read but not yet placed (`carry`)."""
        cfg = self.cfg
        return {"version": _STATE_VERSION, "epoch": self.epoch, "next_index": self.next_index,
                "carry": [list(p) for p in self.carry], "packing": self.packing,
                "num_canonical_nodes": cfg.num_canonical_nodes,
                "seed": cfg.seed, "shuffle": cfg.shuffle, "seq_len": cfg.seq_len, "max_images": cfg.max_images,
                "image_tokens": cfg.image_tokens, "dp_size": self.dp_size, "batch_size": cfg.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from any rank, any dp size or batch size); call before iterating."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"cannot resume the data position: the checkpoint's loader state has version "
                             f"{state.get('version')}, this megaflow reads version {_STATE_VERSION} (token-budget "
                             "packing); start a new run from its weights with train.init_from")
        cfg = self.cfg
        for key, ours in (("num_canonical_nodes", cfg.num_canonical_nodes), ("seed", cfg.seed),
                          ("shuffle", cfg.shuffle)):
            if state[key] != ours:
                raise ValueError(f"cannot resume exactly: the state has {key}={state[key]}, this config "
                                 f"{ours}; the global sample order depends on it, keep it unchanged")
        for key, ours in (("seq_len", cfg.seq_len), ("max_images", cfg.max_images), ("image_tokens", cfg.image_tokens)):
            if state[key] != ours:
                raise ValueError(f"cannot resume exactly: the state's carried document pieces were cut for "
                                 f"{key}={state[key]}, this config has {ours}; keep it unchanged")
        self.epoch, self.next_index = int(state["epoch"]), int(state["next_index"])
        self.carry = [tuple(p) for p in state["carry"]]
        # states written before data.packing existed were packed first-fit: the run goes on the same way
        self.packing = state.get("packing", "first_fit")
        if self.packing not in PACKINGS:
            raise ValueError(f"the loader state has packing={self.packing!r}, this megaflow knows {PACKINGS}")
        if self.packing != resolve_packing(cfg.packing, self.dp_size * cfg.batch_size):
            log.warning(f"resuming with the loader state's packing={self.packing} (data.packing={cfg.packing} "
                        "applies to runs started fresh): the batches are those of the uninterrupted run")

    def close(self) -> None:
        """Release this loader's shared memory and lock files now (also done at process exit)."""
        self._close_prefetch()
        dataset = getattr(self, "dataset", None)
        if dataset is None:
            return
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


def build_loader(cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 pin_memory: bool = False) -> Loader:
    """The training data of data-parallel rank `dp_rank` of `dp_size` (see Loader); `pin_memory`: the
    batches' tensors come in pinned memory (for a CUDA run; done ahead by the prefetch thread, data.prefetch)."""
    return Loader(cfg, tokenizer, dp_rank, dp_size, pin_memory)


def describe_batch(batch: dict) -> dict:
    """Shapes and dtypes of a batch, for logs."""
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in batch.items() if torch.is_tensor(v)}
