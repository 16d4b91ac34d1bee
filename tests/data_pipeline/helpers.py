"""Shared checks and a real-process launcher for the data pipeline tests."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from data_pipeline.config import DataConfig
from tests.forked import Python

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 120


def check_batch(batch: dict, tok, cfg: DataConfig) -> None:
    """Assert every invariant of the batch contract (docs/DATA.md) on one batch."""
    B, T, M, N = cfg.batch_size, cfg.seq_len, cfg.max_images, cfg.image_tokens
    assert batch["tokens"].shape == (B, T) and batch["tokens"].dtype == torch.int64
    for key in ("targets", "position_ids", "doc_ids"):
        assert batch[key].shape == (B, T) and batch[key].dtype == torch.int64, key
    assert batch["image_mask"].dtype == torch.bool and batch["image_mask"].shape == (B, T)
    assert batch["images"].shape == (B, M, cfg.channels, cfg.image_size, cfg.image_size)
    assert batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    tokens, targets, docs = batch["tokens"], batch["targets"], batch["doc_ids"]
    assert torch.equal(batch["image_mask"], tokens == tok.image_id)
    for b in range(B):
        n_valid = int(batch["image_valid"][b].sum())
        assert int(batch["image_mask"][b].sum()) == N * n_valid
        assert torch.all(batch["images"][b, n_valid:] == 0)
        assert not batch["image_valid"][b, n_valid:].any()
        pad = docs[b] == -1
        assert torch.all(tokens[b][pad] == tok.pad_id) and torch.all(targets[b][pad] == -100)
        assert not torch.any(tokens[b][~pad] == tok.pad_id)
        # padding only at the end, doc ids increase 0, 1, 2, ... and positions restart per doc
        n_real = int((~pad).sum())
        assert not pad[:n_real].any()
        ids = docs[b, :n_real]
        assert torch.all(ids[1:] - ids[:-1] >= 0) and torch.all(ids[1:] - ids[:-1] <= 1)
        for d in ids.unique().tolist():
            where = (docs[b] == d).nonzero().flatten()
            assert torch.equal(batch["position_ids"][b, where], torch.arange(len(where)))
        # images are whole: boi, N image slots, eoi, all in one document
        row = tokens[b].tolist()
        for t, token in enumerate(row):
            if token == tok.boi_id:
                assert row[t + 1 : t + 1 + N] == [tok.image_id] * N and row[t + 1 + N] == tok.eoi_id
                assert len(set(docs[b, t : t + N + 2].tolist())) == 1
        # targets: next token, same document, text-like only
        for t in range(T):
            target = int(targets[b, t])
            if target == -100:
                continue
            assert t + 1 < T and target == row[t + 1] and docs[b, t] == docs[b, t + 1]
            assert target != tok.image_id and target != tok.pad_id
            assert target < tok.base_vocab or target in (tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id)


def config_dict(cfg: DataConfig) -> dict:
    return asdict(cfg)


def run_ranks(jobs: list[dict], tmp_path) -> list[dict]:
    """Run each job (see rank_worker.py) in its own process (forked: tests/forked.py) at once;
    return their JSON results."""
    procs = []
    for i, job in enumerate(jobs):
        job_path = tmp_path / f"job{i}.json"
        out_path = tmp_path / f"result{i}.json"
        job_path.write_text(json.dumps(job))
        env = dict(os.environ, RANK=str(job["dp_rank"]), WORLD_SIZE=str(job["dp_size"]),
                   LOCAL_RANK=str(i), LOCAL_WORLD_SIZE=str(len(jobs)), PYTHONPATH=REPO)
        procs.append((Python(["-m", "tests.data_pipeline.rank_worker", job_path, out_path], REPO, env), out_path))
    results = []
    try:
        for proc, out_path in procs:
            res = proc.wait(timeout=TIMEOUT_S)
            assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
            results.append(json.loads(out_path.read_text()))
    finally:
        for proc, _ in procs:
            proc.kill()
    return results
