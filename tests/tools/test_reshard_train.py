"""tools/reshard.py on checkpoints of real multi-process `megaflow train` runs, launched the way a
user launches them (launchers/local.sh 2 -> torchrun -> 2 gloo processes, configs/tiny.yaml).

Contract: a PP=2 run (1F1B, 3 micro-batches; dp = 1, so its data and noise are one process's),
with the ParallelEngine and with ZeRO-1, saved (sharded: state/, one file per rank) at step 3 of 5
and resharded with `--out`, resumes in ONE process with `megaflow train --resume` and repeats the
distributed run's losses at steps 4 and 5 (1e-5: the pipeline's and the single process's sums
differ in rounding only); the copied history keeps steps 1-3 identical. `inspect` reports each
source's layout (pp 2, dp 1, its ZeRO stage; two per-rank files, AdamW step 3).
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests.train.conftest import REPO, megaflow, tiny_sets, train_args  # noqa: F401  (tiny_sets: fixture)
from tools import reshard
from tools.inspect_checkpoint import inspect

STEPS = ["train.steps=5", "train.save_every=3", "train.keep_last=5", "train.eval_data="]


def history(run) -> list:
    trainer = torch.load(run / "checkpoints" / "step_000005" / "trainer.pt", weights_only=False)
    return [h["loss"] for h in trainer["history"]]


@pytest.mark.parametrize("engine", ["parallel", "zero1"])
def test_pp2_run_resharded_resumes_in_one_process(tiny_sets, tmp_path, engine):  # noqa: F811
    more = ["parallel.pp=2", "parallel.micro_batches=3"] + (["parallel.zero_stage=1"] if engine == "zero1" else [])
    run, one = tmp_path / "pp2", tmp_path / "one"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(["bash", "launchers/local.sh", "2", *map(str, train_args(tiny_sets, run, *STEPS, *more)[1:])],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    src = run / "checkpoints" / "step_000003"
    assert (src / "state" / ".metadata").is_file() and not (src / "model.pt").exists()
    info = inspect(str(src))
    opt = info["optimizer"]
    assert (opt["pp"], opt["dp"], opt["zero_stage"]) == (2, 1, 1 if engine == "zero1" else 0), opt
    assert opt["files"] == 2 and opt["adam_step"] == 3 and info["zero"] is None, opt

    assert reshard.main([str(src), "--out", str(one)]) == 0
    out = megaflow(*train_args(tiny_sets, one, *STEPS), "--resume")
    assert "at step 3" in out.stderr, out.stderr[-2000:]
    a, b = history(run), history(one)
    assert len(a) == len(b) == 5 and a[:3] == b[:3]
    assert max(abs(x - y) for x, y in zip(a[3:], b[3:])) < 1e-5, (a, b)
