"""Exact resume and crash safety of `megaflow train` checkpoints (configs/tiny.yaml on CPU)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from megaflow.checkpoint import find_latest, list_checkpoints, resolve, validate
from tests.forked import run_python
from tests.train.conftest import REPO, megaflow, run_env, train_args

CRASH_AFTER_SAVE = """
import os, sys
import megaflow.train as T
real_save = T.save
def save(out, step, *a, **k):
    path = real_save(out, step, *a, **k)
    if step == int(os.environ["CRASH_STEP"]):
        os._exit(9)  # a hard crash right after this checkpoint: no cleanup, no final save
    return path
T.save = save
sys.exit(T.main(sys.argv[1:]))
"""


def _load(ckpt: Path, name: str):
    return torch.load(ckpt / name, map_location="cpu", weights_only=False)


def test_resume_matches_uninterrupted_run_bit_for_bit(tiny_sets, tmp_path):
    """Contract: 12 steps in one go, and 6 steps + a hard crash + `--resume` to 12, give the same loss
    at EVERY step (== on floats, no tolerance), the same final weights and the same optimizer state:
    model, optimizer, LR schedule, per-step noise and the data loader's position are all restored. The
    split run reads its data through the prefetch thread (data.prefetch=2: batches planned ahead of the
    step, the crash with batches in flight), the whole run without it: the same batches and resume point."""
    sets = ["train.steps=12", "train.save_every=6", "train.keep_last=5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    megaflow(*train_args(tiny_sets, whole, *sets, "data.prefetch=0"))

    split_sets = [*sets, "data.prefetch=2"]
    args = train_args(tiny_sets, split, *split_sets)[1:]  # without the "train" command word
    crashed = run_python(["-c", CRASH_AFTER_SAVE, *args], REPO, run_env(CRASH_STEP="6"))
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(split / "checkpoints")] == ["step_000006"]
    resumed = megaflow(*train_args(tiny_sets, split, *split_sets), "--resume")
    assert "resumed from" in resumed.stderr and "step_000006 at step 6" in resumed.stderr

    a, b = whole / "checkpoints" / "step_000012", split / "checkpoints" / "step_000012"
    hist_a, hist_b = _load(a, "trainer.pt")["history"], _load(b, "trainer.pt")["history"]
    assert [h["step"] for h in hist_a] == list(range(1, 13))
    assert hist_b == hist_a, [(x, y) for x, y in zip(hist_a, hist_b) if x != y]
    model_a, model_b = _load(a, "model.pt"), _load(b, "model.pt")
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "final weights differ"
    opt_a, opt_b = _load(a, "optim.pt")["optimizer"]["state"], _load(b, "optim.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i]), "optimizer states differ"
    # the resumed half really trained: its weights moved away from the step-6 checkpoint
    mid = _load(split / "checkpoints" / "step_000006", "model.pt")
    assert any(not torch.equal(mid[k], model_b[k]) for k in mid)


KILLED_SAVE = """
import os, sys, time
from pathlib import Path
from megaflow.checkpoint import find_latest, save_checkpoint
root, ready = Path(sys.argv[1]), Path(sys.argv[2])
src = find_latest(root)
def write(d):
    (d / "model.pt").write_bytes((src / "model.pt").read_bytes())
    data = (src / "optim.pt").read_bytes()
    with open(d / "optim.pt", "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        ready.write_text(str(os.getpid()))
        time.sleep(600)  # killed here, half-way through the save
save_checkpoint(root, 999, write, keep_last=2)
"""


def test_save_killed_midway_leaves_previous_checkpoint_loadable(tiny_run, tiny_sets, tmp_path):
    """Contract: a process killed with SIGKILL in the middle of writing checkpoint 999 leaves only a
    `.tmp-step_000999-PID` directory: find_latest/resolve still return the previous checkpoint,
    which loads for generation and from which `--resume` continues (the history up to it intact);
    the dead process's .tmp directory is removed by the next save. A `step_*` directory without
    meta.json (a non-atomic copy, say) is never picked either."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    root = run / "checkpoints"
    before = find_latest(root)
    assert before is not None and before.name == "step_000060"
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(root), str(ready)], cwd=REPO, env=env)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, f"the saving process exited early ({proc.returncode})"
            assert time.time() < deadline, "the saving process never reached the middle of its save"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = list(root.glob(".tmp-step_000999-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "optim.pt").is_file()
    assert not (root / "step_000999").exists()
    (root / "step_000070").mkdir()  # complete-looking name, no meta.json
    (root / "step_000070" / "model.pt").write_bytes(b"partial")

    assert find_latest(root) == before
    assert resolve(run) == before and resolve(root) == before
    validate(before)
    from megaflow.inference import load_for_inference
    model, tok, cfg, ckpt = load_for_inference(run)
    assert ckpt == before

    shutil.rmtree(root / "step_000070")
    old = _load(before, "trainer.pt")["history"]
    res = megaflow(*train_args(tiny_sets, run, "train.steps=62"), "--resume")
    assert "step_000060 at step 60" in res.stderr
    assert not list(root.glob(".tmp-step_*")), "the dead save's temporary directory was not cleaned up"
    new = _load(root / "step_000062", "trainer.pt")["history"]
    assert [h["step"] for h in new] == list(range(1, 63)) and new[:60] == old
