"""A checkpoint saved exactly at the end of a data epoch resumes (issue 11 case 2): the loader state
after an epoch's last batch is the next epoch's start, not "the whole epoch consumed" (which made
the resumed run fail with 'yields no batches', every time)."""
from __future__ import annotations

import json

from megaflow.config import load_config
from tests.train.conftest import TINY, megaflow, train_args


def _steps_in_first_epoch(tiny_sets) -> int:
    from data_pipeline.loader import build_loader
    from megaflow.train import load_run_tokenizer
    cfg = load_config(str(TINY), tiny_sets)
    with build_loader(cfg.data, load_run_tokenizer(cfg)) as loader:
        return sum(1 for _ in loader)


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tiny_sets, tmp_path):
    """`train.steps=K` with K the first epoch's length, then `train.steps=K+10 --resume`: the second
    run resumes at step K in epoch 1 and trains to K+10."""
    k = _steps_in_first_epoch(tiny_sets)
    out = tmp_path / "run"
    sets = ["train.save_every=0", "train.eval_data=", "train.sample_every=0"]
    megaflow(*train_args(tiny_sets, out, *sets, f"train.steps={k}"))
    import torch
    state = torch.load(out / "checkpoints" / f"step_{k:06d}" / "trainer.pt", weights_only=False)["loader"]
    assert state["epoch"] == 1 and state["next_index"] == 0 and state["carry"] == []
    resumed = megaflow(*train_args(tiny_sets, out, *sets, f"train.steps={k + 10}"), "--resume")
    assert f"at step {k}" in resumed.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == k + 10 and result["data"]["batches"] == 10 and result["data"]["dropped_docs"] == 0
