"""tools/inspect_checkpoint.py (`megaflow inspect`) on a checkpoint of a real 5-step tiny run.

Contract: on a good checkpoint it exits 0 and reports the step (meta and trainer), the config, the
parameter counts per part (equal to megaflow.cli.count_parameters of the model, total = the sum of
model.pt's distinct tensors), the AdamW state (one entry per trainable parameter, step 5) and, with
--tensors, every model.pt tensor with its shape and dtype. It exits 2 with a message that names
the problem on: a missing meta.json (interrupted save), a truncated model.pt, a model.pt of the
right size with garbage inside, a model.pt of another config, and a ZeRO layout with a shard
missing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megaflow.checkpoint import file_digest
from megaflow.cli import main as cli_main
from tests.forked import run_python
from tools.inspect_checkpoint import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    res = run_python(["-m", "megaflow.cli", "train", "--config", "configs/tiny.yaml", "--set", "train.steps=5",
                      "--set", f"train.out_dir={out}", "--set", "train.report=false", "--set", "train.eval_data="], REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def copy_ckpt(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "step_000005"
    shutil.copytree(run_dir / "checkpoints" / "step_000005", dst)
    return dst


def test_reports_a_good_checkpoint(run_dir, capsys):
    assert cli_main(["inspect", str(run_dir), "--tensors"]) == 0
    text = capsys.readouterr().out
    for want in ("step 5", "trainer: step 5", "vlm stream", "deep flow stream", "AdamW", "units.0.vlm_layers.0",
                 "ok: complete and consistent"):
        assert want in text, want
    assert main([str(run_dir / "checkpoints" / "step_000005"), "--json", "--tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    state = torch.load(run_dir / "checkpoints" / "step_000005" / "model.pt", weights_only=True)
    distinct = {t.data_ptr(): t.numel() for t in state.values()}
    assert info["meta"]["step"] == 5 and info["trainer"]["step"] == 5
    assert info["parameters"]["total"] == sum(distinct.values()) > 0
    assert info["parameters"]["trainable in this stage"] == info["parameters"]["total"]  # stage all, no FAE weights
    assert info["optimizer"] == {"kind": "AdamW", "params_with_state": len(state), "groups": 2, "adam_step": 5}
    assert info["zero"] is None
    assert {k: tuple(v["shape"]) for k, v in info["tensors"].items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_bad_checkpoints_exit_2(run_dir, tmp_path, capsys):
    def fails(ckpt, needle):
        assert main([str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert needle in err, err

    ck = copy_ckpt(run_dir, tmp_path / "a")
    (ck / "meta.json").unlink()
    fails(ck, "incomplete: no meta.json")

    ck = copy_ckpt(run_dir, tmp_path / "b")
    data = (ck / "model.pt").read_bytes()
    (ck / "model.pt").write_bytes(data[: len(data) // 2])
    fails(ck, "truncated or corrupt")

    ck = copy_ckpt(run_dir, tmp_path / "c")
    (ck / "model.pt").write_bytes(b"\0" * len(data))  # right size, garbage inside
    fails(ck, "cannot read model.pt")

    ck = copy_ckpt(run_dir, tmp_path / "d")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["flow"]["dim"] = 64
    (ck / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"]["config.json"] = (ck / "config.json").stat().st_size
    meta["checksums"]["config.json"] = file_digest(ck / "config.json")  # an edit that meta.json agrees with
    (ck / "meta.json").write_text(json.dumps(meta))
    fails(ck, "model.pt's 'flow_start' has shape (32,), config.json's model has (64,)")

    ck = copy_ckpt(run_dir, tmp_path / "e")
    (ck / "zero").mkdir()
    (ck / "zero" / "layout.json").write_text(json.dumps({"zero_stage": 1, "tp": 1, "pp": 1, "dp": 2}))
    (ck / "zero" / "pp00_tp00_dp000.pt").write_bytes(b"x")
    fails(ck, "1 of 2 ZeRO shards are missing (e.g. zero/pp00_tp00_dp001.pt)")
