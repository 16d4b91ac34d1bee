"""Bad input: every case fails fast with a message naming the shard (and sample), or, where the user
asked for it, is skipped, logged and counted; nothing hangs; stale shared memory is cleaned."""

import io
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from multiprocessing import shared_memory

import numpy as np
import pytest
from PIL import Image

from data_pipeline.config import DataConfig, TokenizerSpec
from data_pipeline.loader import build_loader, clean_stale_shared_memory
from data_pipeline.schema import COLUMNS, BadSampleError, make_sample, pack_blobs
from data_pipeline.streaming_compat import MDSWriter


def _cfg(data_dir, **kw) -> DataConfig:
    base = dict(local=str(data_dir), seq_len=96, batch_size=4, image_size=8,
                patch_size=2, channels=1, image_fit="exact", image_mode="exact", max_images=2,
                num_canonical_nodes=1, shuffle=False, timeout_s=10, tokenizer=TokenizerSpec(kind="mistral"))
    base.update(kw)
    return DataConfig(**base)


def _write(out, samples, shard_bytes=1 << 20):
    with MDSWriter(out=str(out), columns=COLUMNS, compression=None, hashes=["xxh64"], size_limit=shard_bytes) as w:
        for sample in samples:
            w.write(sample)
    return str(out)


def _good(i):
    return make_sample([f"digit {i}", np.full((8, 8), i, np.uint8)], {"i": i})


def _epoch(cfg, tok):
    with build_loader(cfg, tok) as loader:
        ids = [i for _ in loader for i in loader.last_sample_ids]
        return ids, dict(loader.stats)


def test_corrupt_sample_names_shard_and_sample_or_is_skipped(tmp_path, tok, caplog):
    samples = [_good(i) for i in range(8)]
    samples[5] = make_sample(["broken"], {"i": 5})
    samples[5]["images"] = pack_blobs([b"JUNK"])  # an "image" that is not one
    samples[5]["segments"].append({"kind": "image", "format": "png", "shape": [8, 8, 1], "loss": True})
    data = _write(tmp_path / "mds", samples, shard_bytes=700)
    index = json.load(open(os.path.join(data, "index.json")))
    offsets = np.cumsum([0] + [s["samples"] for s in index["shards"]])
    shard = int(np.searchsorted(offsets, 5, side="right") - 1)
    name, within = index["shards"][shard]["raw_data"]["basename"], 5 - offsets[shard]
    with pytest.raises(BadSampleError, match=rf"{name} \(shard {shard}\) sample {within} \(global sample 5\)"):
        _epoch(_cfg(data), tok)
    with caplog.at_level(logging.WARNING):
        ids, stats = _epoch(_cfg(data, skip_bad_samples=True), tok)
    assert sorted(ids) == list(range(8)) and stats["skipped"] == 1 and stats["docs"] == 7
    assert name in caplog.text and "skipped so far" in caplog.text


def test_corrupt_bytes_in_a_shard_file(tmp_path, tok):
    data = _write(tmp_path / "mds", [_good(i) for i in range(4)])
    path = os.path.join(data, "shard.00000.mds")
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b"IDAT", len(raw) // 2)  # inside the PNG of a late sample
    raw[at + 8 : at + 16] = b"\xff" * 8
    open(path, "wb").write(bytes(raw))
    with pytest.raises(BadSampleError, match=r"shard\.00000\.mds \(shard 0\) sample \d"):
        _epoch(_cfg(data), tok)
    with pytest.raises(BadSampleError, match=r"corrupt shard: shard\.00000\.mds \(shard 0\) xxh64"):
        build_loader(_cfg(data, validate_hashes=True), tok)


def test_missing_shard(tmp_path, tok):
    data = _write(tmp_path / "mds", [_good(i) for i in range(8)], shard_bytes=700)
    os.remove(os.path.join(data, "shard.00001.mds"))
    with pytest.raises(FileNotFoundError, match=r"missing shard: shard\.00001\.mds \(shard 1"):
        build_loader(_cfg(data), tok)


def test_missing_shard_on_the_remote_fails_fast(tmp_path, tok):
    data = _write(tmp_path / "mds", [_good(i) for i in range(8)], shard_bytes=700)
    os.remove(os.path.join(data, "shard.00001.mds"))
    start = time.time()
    with pytest.raises(BadSampleError, match=r"shard\.00001\.mds"):
        _epoch(_cfg(tmp_path / "cache", remote=data, timeout_s=5), tok)
    assert time.time() - start < 30


def test_index_not_matching_shards(tmp_path, tok):
    data = _write(tmp_path / "mds", [_good(i) for i in range(8)], shard_bytes=700)
    index_path = os.path.join(data, "index.json")
    good_index = open(index_path).read()
    index = json.loads(good_index)
    index["shards"][1]["samples"] += 1
    json.dump(index, open(index_path, "w"))
    with pytest.raises(BadSampleError, match=r"index.json does not match its shards.*shard\.00001\.mds \(shard 1\)"):
        build_loader(_cfg(data), tok)
    open(index_path, "w").write(good_index)
    with open(os.path.join(data, "shard.00002.mds"), "ab") as f:
        f.write(b"extra")
    with pytest.raises(BadSampleError, match=r"shard\.00002\.mds \(shard 2\) has \d+ bytes, the file has"):
        build_loader(_cfg(data), tok)
    open(index_path, "w").write("{not json")
    with pytest.raises(BadSampleError, match=r"index.json is not a valid MDS index"):
        build_loader(_cfg(data), tok)


def _png(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_wrong_image_size_or_mode(tmp_path, tok):
    wrong_size = make_sample(["too big", np.zeros((12, 12), np.uint8)], {})
    wrong_mode = make_sample(["rgb", np.zeros((8, 8, 3), np.uint8)], {})
    sixteen_bit = make_sample(["16 bit", np.zeros((8, 8), np.uint8)], {})
    sixteen_bit["images"] = pack_blobs([_png(np.zeros((8, 8), np.uint16))])
    data = _write(tmp_path / "mds", [_good(0), wrong_size, wrong_mode, sixteen_bit])
    with pytest.raises(BadSampleError, match=r"shard\.00000\.mds \(shard 0\) sample 1 .*12x12 but image_size=8"):
        _epoch(_cfg(data), tok)
    with pytest.raises(BadSampleError, match=r"sample 2 .*mode 'RGB' but channels=1"):
        _epoch(_cfg(data, image_fit="resize"), tok)
    with pytest.raises(BadSampleError, match=r"sample 3 .*only 8-bit modes"):
        _epoch(_cfg(data, image_fit="resize", image_mode="convert"), tok)
    ids, stats = _epoch(_cfg(data, skip_bad_samples=True), tok)
    assert sorted(ids) == [0, 1, 2, 3] and stats["skipped"] == 3 and stats["docs"] == 1


def test_empty_document(tmp_path, tok):
    empty = {"segments": [], "images": (0).to_bytes(4, "little"), "meta": {}}
    data = _write(tmp_path / "mds", [_good(0), _good(1), empty])
    with pytest.raises(BadSampleError, match=r"shard\.00000\.mds \(shard 0\) sample 2 .*empty document"):
        _epoch(_cfg(data), tok)
    with pytest.raises(ValueError, match="empty document"):
        make_sample([], {"doc": 7})


def test_errors_from_worker_processes_and_the_prefetch_thread_name_the_sample(tmp_path, tok):
    """The error reaches the loop as it is, from a worker, from the prefetch thread (data.prefetch), or both."""
    data = _write(tmp_path / "mds", [_good(0), make_sample(["x", np.zeros((9, 9), np.uint8)], {})])
    for kw in (dict(num_workers=1), dict(prefetch=2), dict(num_workers=1, prefetch=1)):
        with pytest.raises(BadSampleError, match=r"shard\.00000\.mds \(shard 0\) sample 1"):
            _epoch(_cfg(data, **kw), tok)


def test_stale_shared_memory_is_removed_live_is_kept(tmp_path, tok):
    stale = "/dev/shm/999990_locals"
    open(stale, "wb").write(b"\0" * 8)  # what a kill -9 leaves: a segment nobody maps
    live = shared_memory.SharedMemory(name="999991_locals", create=True, size=8)
    try:
        removed = clean_stale_shared_memory()
        assert stale in removed and not os.path.exists(stale)
        assert os.path.exists("/dev/shm/999991_locals")
    finally:
        live.close()
        live.unlink()
