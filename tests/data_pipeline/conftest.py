"""Fixtures: small MDS datasets built once per session, the mistral tokenizer, a /dev/shm leak check."""

import os
import re

import pytest

from data_pipeline.config import TokenizerSpec
from data_pipeline.loader import _mapped_shm_names
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.writers import FASHION_MNIST_DIR, build_dataset

_STREAMING_SHM = re.compile(r"^\d{6}_")


def _streaming_shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if _STREAMING_SHM.match(n)} if os.path.isdir("/dev/shm") else set()


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    """Every test must leave no Streaming segment behind in /dev/shm. Segments that a live process
    maps belong to someone still running (other jobs on this host may use Streaming too)."""
    before = _streaming_shm()
    yield
    leaked = _streaming_shm() - before - _mapped_shm_names()
    assert not leaked, f"test left shared memory behind: {sorted(leaked)}"


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(TokenizerSpec(kind="mistral"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "mds"
    build_dataset("digits", str(out), limit=96, shard_bytes=6000, seed=1)
    return str(out)


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fashion") / "mds"
    from data_pipeline.cli import main

    assert main(["build", "fashion_mnist", "--out", str(out), "--limit", "96", "--shard-bytes", "30000"]) == 0
    return str(out)
