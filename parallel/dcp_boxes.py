"""Rectangular pieces ("boxes") of global tensors, saved and loaded with torch.distributed.checkpoint.

A rank describes what it holds of each tensor of the one-process model as `Boxes`: the tensor's
GLOBAL size and a list of (global offsets, local tensor) pieces. A tensor-parallel shard is one box
offset along its split dimension; a ZeRO fragment (a flat range of a shard) is a few boxes
(`flat_boxes`); a replicated tensor is one box at offset 0 on every replica (DCP writes it once).
DCP does the rest: `save_boxes` writes each rank's own pieces (one file per rank, metadata by the
coordinator last) and `load_boxes` reads, for each destination box of this rank, the overlapping
parts of whatever boxes the checkpoint was written with: that is resharding on load, at any layout.

No DTensor or DeviceMesh: a layout this general (ZeRO fragments of TP shards of pipeline stages)
is a list of boxes, which DCP's planners accept through the two planners below.
Not here: which pieces an engine holds (parallel/checkpoint_state.py), checkpoint directories.
"""
from __future__ import annotations

import io
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import (_create_read_items, _create_write_items,
                                                          create_read_items_for_chunk_list)


class Boxes:
    """This rank's pieces of one global tensor of size `size`: [(offsets, tensor)], each tensor of
    the box's shape (a view into live storage, or a buffer to fill on load)."""

    def __init__(self, size, boxes=()):
        self._size = torch.Size(size)
        self.boxes = []
        for offsets, t in boxes:
            self.add(offsets, t)

    def add(self, offsets, t: torch.Tensor) -> None:
        offsets = torch.Size(offsets)
        if t.numel() == 0 or any(o == offsets for o, _ in self.boxes):
            return  # empty, or the same box twice (a tied weight named twice on one rank)
        if len(offsets) != len(self._size) or any(o + s > g for o, s, g in zip(offsets, t.shape, self._size)):
            raise ValueError(f"box at {tuple(offsets)} of shape {tuple(t.shape)} lies outside {tuple(self._size)}")
        self.boxes.append((offsets, t))

    def size(self) -> torch.Size:
        return self._size

    def at(self, offsets) -> torch.Tensor:
        for o, t in self.boxes:
            if o == torch.Size(offsets):
                return t
        raise KeyError(f"no box at {tuple(offsets)}")

    def chunks(self) -> list:
        return [ChunkStorageMetadata(offsets=o, sizes=t.shape) for o, t in self.boxes]

    def write_items(self, fqn: str) -> list:
        return [WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=o, sizes=t.shape),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self._size))
                for o, t in self.boxes]


def flat_boxes(shape, start: int, numel: int) -> list:
    """[(offsets, sizes, flat_start)]: the range [start, start + numel) of the row-major flattening of
    a tensor of `shape` as boxes, each contiguous in memory (flat_start: where it begins, counted from
    `start`). At most 2 * ndim - 1 boxes."""
    shape = list(shape)
    if not shape:
        return [((), (), 0)] if numel else []
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    out, s, end = [], start, start + numel
    while s < end:
        k = next(k for k in range(len(shape)) if s % strides[k] == 0 and s + strides[k] <= end)
        idx, rem = [], s
        for st in strides:
            idx.append(rem // st)
            rem %= st
        n = min((end - s) // strides[k], shape[k] - idx[k])
        out.append((tuple(idx), tuple([1] * k + [n] + shape[k + 1:]), s - start))
        s += n * strides[k]
    return out


def add_flat(boxes: Boxes, local_shape, origin, start: int, flat: torch.Tensor) -> None:
    """Add `flat` (numel n), the elements [start, start + n) of a local tensor of `local_shape` that
    sits at `origin` (offsets) inside the global tensor, as boxes viewing `flat`'s storage."""
    for offsets, sizes, at in flat_boxes(local_shape, start, flat.numel()):
        n = math.prod(sizes)
        boxes.add([o + c for o, c in zip(origin, offsets)], flat[at:at + n].view(sizes))


class _SavePlanner(DefaultSavePlanner):
    """DCP's default planner (dedup of replicated boxes, validation that the boxes of each tensor
    neither overlap nor leave holes), with `Boxes` values."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, obj in self.state_dict.items():
            items += obj.write_items(fqn) if isinstance(obj, Boxes) else _create_write_items(fqn, obj)
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.at(index.offset) if isinstance(obj, Boxes) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict, metadata=None, is_coordinator: bool = False) -> None:
        # the default set-up deep-copies values it does not know (our Boxes): load in place instead
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, obj in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise KeyError(fqn)
            if isinstance(obj, Boxes):
                if not isinstance(md, TensorStorageMetadata) or md.size != obj.size():
                    size = tuple(md.size) if isinstance(md, TensorStorageMetadata) else "not a tensor"
                    raise ValueError(f"{fqn}: the checkpoint has size {size}, this model {tuple(obj.size())}")
                requests += create_read_items_for_chunk_list(fqn, md, obj.chunks())
            else:
                requests += _create_read_items(fqn, md, obj)
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        return obj.at(index.offset) if isinstance(obj, Boxes) else super().lookup_tensor(index)


def _dist(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (group is not None or dist.get_world_size() > 1)


WRITER_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


class _HashingStream(io.RawIOBase):
    """A file being written, its xxh3-128 updated with every byte (DCP writes each file in order)."""

    def __init__(self, f, digest):
        super().__init__()
        self.f, self.digest = f, digest

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.digest.update(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording the checksum meta.json needs (megaflow.checkpoint.HASH) of
    every file as it is written, so the commit does not read the checkpoint back."""

    def __init__(self):
        super().__init__()
        self.digests, self.lock = {}, threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        if mode != "wb":
            with super().create_stream(path, mode) as f:
                yield f
            return
        digest = xxhash.xxh3_128()
        with super().create_stream(path, mode) as f:
            yield _HashingStream(f, digest)
        with self.lock:
            self.digests[str(path)] = digest.hexdigest()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self.lock:
            if str(path) in self.digests:
                self.digests[str(new_path)] = self.digests.pop(str(path))


@contextmanager
def _no_zip_crc():
    """torch.save without its per-record zip CRC-32 (a third of the serialisation time on CPU): the
    files' xxh3 checksums in meta.json cover every byte. Counted, so overlapping saves (an async save
    and a synchronous one) restore it only when the last one ends."""
    global _crc_off
    with _crc_lock:
        if _crc_off == 0:
            torch.serialization.set_crc32_options(False)
        _crc_off += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_off -= 1
            if _crc_off == 0:
                torch.serialization.set_crc32_options(True)


_crc_lock, _crc_off = threading.Lock(), 0


def save_boxes(state: dict, directory: Path, group=None) -> dict:
    """Collective over `group` (default: the world; no process group: this process alone): every
    rank writes its boxes of `state` ({key: Boxes or a picklable object}) into `directory`. Returns
    {file name: xxh3-128 hex digest} of the files this rank wrote (.metadata on the coordinator).
    Every file is fsync'd by its writer thread before the checkpoint is committed (a power loss must
    not leave `latest` naming torn files after older checkpoints were pruned; about 0.4 s per rank
    per 0.8 GB on this CPU); the writer threads and the CRC-32 are docs/benchmarks.md's "sharded
    save" section."""
    # several writer threads per rank: one thread wrote ~0.6 GB/s on an H200 host (docs/benchmarks.md)
    writer = dcp.FileSystemWriter(str(directory), thread_count=WRITER_THREADS, sync_files=True)
    writer.fs = _HashingFileSystem()
    with _no_zip_crc():
        dcp.save(state, storage_writer=writer, planner=_SavePlanner(), process_group=group, no_dist=not _dist(group))
    return {Path(k).name: v for k, v in writer.fs.digests.items() if Path(k).parent == Path(directory)}


def checkpoint_keys(directory: Path) -> dict:
    """{key: global size (torch.Size) or None for a non-tensor object} of a DCP directory."""
    md = dcp.FileSystemReader(str(directory)).read_metadata()
    return {k: (v.size if isinstance(v, TensorStorageMetadata) else None) for k, v in md.state_dict_metadata.items()}


def load_boxes(state: dict, directory: Path, group=None, local: bool = False) -> dict:
    """Fill every box of `state` from `directory`; non-tensor entries are replaced by the saved
    objects (the returned dict). Collective like `save_boxes`, unless `local` (this process only)."""
    reader = dcp.FileSystemReader(str(directory))
    dcp.load(state, storage_reader=reader, planner=_LoadPlanner(), process_group=group,
             no_dist=local or not _dist(group))
    return state


def read_full(directory: Path, keys: Optional[list] = None) -> dict:
    """{key: full tensor (or object)} of `keys` (default: all), in this process without a process
    group: for tools (export, inspection) that want whole tensors, one checkpoint at a time."""
    sizes = checkpoint_keys(directory)
    md = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    state = {}
    for k in keys if keys is not None else list(sizes):
        if sizes[k] is None:
            state[k] = None
        else:
            t = torch.empty(sizes[k], dtype=md[k].properties.dtype)
            state[k] = Boxes(sizes[k], [([0] * len(sizes[k]), t)])
    writer = dcp.FileSystemReader(str(directory))
    dcp.load(state, storage_reader=writer, planner=_LoadPlanner(), no_dist=True)
    return {k: (v.boxes[0][1] if isinstance(v, Boxes) and v.boxes else
                torch.empty(v.size()) if isinstance(v, Boxes) else v) for k, v in state.items()}


def staged(state: dict) -> dict:
    """`state` with every box copied to CPU memory: what an asynchronous save writes while the
    training step changes the originals."""
    return {k: Boxes(v.size(), [(o, t.detach().to("cpu", copy=True)) for o, t in v.boxes]) if isinstance(v, Boxes)
            else v for k, v in state.items()}
