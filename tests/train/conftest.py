"""Fixtures of the train/generate tests: the digits data and tokenizer of configs/tiny.yaml, built
once per session into a temporary directory, and one tiny trained run to generate from.

Runs go through child processes (`python -m megaflow.cli`, forked from the session's preloaded
forkserver: tests/forked.py) the way a user runs them: each owns its Streaming shared memory and its
torch thread settings, and a crash or kill is a real one."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.forked import run_python

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


def run_env(**more: str) -> dict:
    """The environment of the runs: this one, offline, with the repo importable."""
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", **more)


def megaflow(*args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m megaflow.cli ARGS` in the repo (a child process forked from the preloaded
    forkserver, tests/forked.py), with the test environment; returns the result."""
    res = run_python(["-m", "megaflow.cli", *args], REPO, run_env(), timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"megaflow {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="session")
def tiny_sets(tmp_path_factory) -> list:
    """`--set` overrides that point configs/tiny.yaml at a session copy of the digits data."""
    from megaflow.config import load_config
    from megaflow.train import prepare_data
    root = tmp_path_factory.mktemp("digits")
    sets = [f"data.local={root}/train", f"train.eval_data={root}/test", f"data.tokenizer.path={root}/tokenizer.model"]
    prepare_data(load_config(str(TINY), sets))
    return sets


def train_args(sets: list, out: Path, *more: str) -> list:
    args = ["train", "--config", TINY]
    for s in [*sets, f"train.out_dir={out}", *more]:
        args += ["--set", s]
    return args


@pytest.fixture(scope="session")
def tiny_run(tiny_sets, tmp_path_factory) -> Path:
    """configs/tiny.yaml trained for its 60 steps; the run directory."""
    out = tmp_path_factory.mktemp("tiny_run")
    megaflow(*train_args(tiny_sets, out))
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 60
    data = result["data"]  # what the reader did, for the user to see drops and skips
    assert data["batches"] == 60 and data["docs"] + data["skipped"] == data["samples"] > 60
    assert data["dropped_docs"] == 0 and 0.5 < data["slot_fill"] <= 1
    return out
