"""Nothing lost, nothing silently wrong (issue 11): one test per case, each failing on the code
before the fix. Cases: 1 prepare never deletes a user's directory; 3 NaN/Inf gradients skip the
step (counted, limited) and no non-finite checkpoint is written or loaded; 4 a fresh run refuses an
out_dir holding checkpoints (--resume / --overwrite); 5 checksums catch bit flips; 6 a reader never
sees a checkpoint vanish while a run saves; 7 bad settings, files and a full disk end in one clear
line and exit 2; 8 dead writers' `.latest.tmpPID` files are cleaned up. (Case 2, the epoch-boundary
resume, is tested with the data loader.) The kill -9 stress test is tests/tools/test_kill_stress.py."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaflow.checkpoint import (CheckpointError, find_latest, list_checkpoints, load_file, resolve,
                                 save_checkpoint, validate)
from megaflow.config import ConfigError, load_config
from tests.forked import run_python
from tests.train.conftest import REPO, TINY, megaflow, train_args


def _train(*args) -> tuple:
    """`megaflow train ARGS` in this process: (exit code, stderr)."""
    from megaflow.cli import main
    import io
    from contextlib import redirect_stderr
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["train", *map(str, args)])
    return rc, err.getvalue()


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


# ----- case 1 -----------------------------------------------------------------------------------------
def test_prepare_never_deletes_a_directory_it_did_not_build(tiny_sets, tmp_path):
    """Contract: data.local (or train.eval_data) naming a non-empty directory without index.json and
    without megaflow's `.megaflow-built` marker stops the run (exit 2, one line naming the key and the
    directory) and every file in it stays; an empty directory is built into; a directory megaflow
    built (marker) that lost its index.json is rebuilt."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    rc, err = _train("--config", TINY, *sum((["--set", s] for s in tiny_sets), []), "--set", f"data.local={user}",
                     "--set", f"train.out_dir={tmp_path / 'out'}", "--set", "train.steps=5")
    line = _one_error_line(err)
    assert rc == 2 and "data.local=" in line and str(user) in line and "notes.txt" in line
    assert (user / "notes.txt").read_text() == "keep" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]

    from megaflow.prepare import MARKER, ensure_dataset
    with pytest.raises(ConfigError, match="train.eval_data="):
        ensure_dataset("digits", str(user), "test", limit=8, key="train.eval_data")
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_dataset("digits", str(empty), "test", limit=8)
    assert (empty / "index.json").is_file() and (empty / MARKER).is_file()
    (empty / "index.json").unlink()  # ours, damaged: rebuilt
    ensure_dataset("digits", str(empty), "test", limit=8)
    assert (empty / "index.json").is_file()


# ----- case 3 -----------------------------------------------------------------------------------------
INF_GRADS = """
import os, sys
import megaflow.train as T
BAD = {int(s) for s in os.environ["INF_STEPS"].split(",")}
step = [0]
init, train_step = T.PlainEngine.__init__, T.PlainEngine.train_step
def patched_init(self, model, *a, **k):
    init(self, model, *a, **k)
    for p in self.params:  # infinite gradients at the listed steps; the loss stays finite
        p.register_hook(lambda g: g * float("inf") if step[0] in BAD else g)
def patched_step(self, *a, **k):
    step[0] += 1
    return train_step(self, *a, **k)
T.PlainEngine.__init__, T.PlainEngine.train_step = patched_init, patched_step
sys.exit(T.main(sys.argv[1:]))
"""


def _run_inf(tiny_sets, out: Path, inf_steps: str, *sets) -> subprocess.CompletedProcess:
    args = train_args(tiny_sets, out, "train.save_every=1", "train.keep_last=0", "train.eval_data=", *sets)[1:]
    return run_python(["-c", INF_GRADS, *args], REPO, dict(os.environ, PYTHONPATH=str(REPO), INF_STEPS=inf_steps))


def _load(ckpt: Path, name: str):
    return torch.load(ckpt / name, map_location="cpu", weights_only=False)


def test_nonfinite_gradients_skip_the_step_and_stop_at_the_limit(tiny_sets, tmp_path):
    """Contract: infinite gradients with a finite loss at steps 2 and 3 skip those optimizer steps:
    the weights and AdamW state after step 3 equal those after step 1 exactly, every checkpoint is
    finite and loads, the history marks the skipped steps and result.json counts them; the run goes
    on (steps 4-5 train). With train.max_skipped_steps=1, the second skipped step stops the run: exit
    2, one line naming the count and the limit, and the checkpoints written are all finite."""
    out = tmp_path / "skip"
    res = _run_inf(tiny_sets, out, "2,3", "train.steps=5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("the optimizer step was skipped") == 2
    root = out / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == [f"step_{s:06d}" for s in range(1, 6)]
    states = {s: (load_file(root / f"step_{s:06d}", "model.pt"), load_file(root / f"step_{s:06d}", "optim.pt"))
              for s in (1, 3, 5)}  # load_file refuses NaN/Inf
    (m1, o1), (m3, o3), (m5, _) = states[1], states[3], states[5]
    assert all(torch.equal(m1[k], m3[k]) for k in m1), "a skipped step changed the weights"
    s1, s3 = o1["optimizer"]["state"], o3["optimizer"]["state"]
    assert all(torch.equal(s1[i][k], s3[i][k]) for i in s1 for k in s1[i]), "a skipped step changed AdamW"
    assert any(not torch.equal(m3[k], m5[k]) for k in m3), "steps 4-5 did not train"
    hist = _load(root / "step_000005", "trainer.pt")["history"]
    assert [h["step"] for h in hist if h.get("skipped")] == [2, 3]
    assert json.loads((out / "result.json").read_text())["skipped_steps"] == 2

    out = tmp_path / "limit"
    res = _run_inf(tiny_sets, out, "2,3,4", "train.steps=6", "train.max_skipped_steps=1")
    line = _one_error_line(res.stderr)
    assert res.returncode == 2 and "2 optimizer steps skipped" in line and "train.max_skipped_steps=1" in line
    for ck in list_checkpoints(out / "checkpoints"):
        validate(ck)
        load_file(ck, "model.pt"), load_file(ck, "optim.pt")


def _skip_dp2(rank, world):
    """2 data-parallel ranks; only rank 1's gradients are infinite at step 2."""
    from megaflow.model.starflow import build_model
    from megaflow.train import PlainEngine
    from parallel.engine import ParallelEngine
    from parallel.runtime import build_stages
    from parallel.topology import Topology
    from tests.parallel.test_pp_dist import _config, _data
    cfg, mcfg, topo = load_config(str(TINY)), _config(2), Topology()
    batch, noise = _data(mcfg)
    rows = slice(2 * rank, 2 * rank + 2)
    out = {}
    for kind in ("plain", "parallel"):
        if kind == "plain":
            engine = PlainEngine(build_model(mcfg, seed=0), cfg, None, dp_group=topo.dp_group)
        else:
            _, stages, tied = build_stages(mcfg, cfg.parallel, topo, torch.device("cpu"), 0, None, 48)
            engine = ParallelEngine(stages, cfg, None, topo, tied)
        step = [0]
        if rank == 1:
            for p in engine.params:
                p.register_hook(lambda g: g * float("inf") if step[0] == 2 else g)
        flags, weights = [], []
        for step[0] in (1, 2, 3):
            flags.append(engine.train_step({k: v[rows] for k, v in batch.items()}, noise[rows], None, 1e-3)["skipped"])
            weights.append([p.detach().clone() for p in engine.params])
        out[kind] = {"flags": flags, "kept": all(torch.equal(a, b) for a, b in zip(weights[0], weights[1])),
                     "moved": any(not torch.equal(a, b) for a, b in zip(weights[1], weights[2])),
                     "finite": all(bool(torch.isfinite(w).all()) for w in weights[2])}
    return out


def test_nonfinite_gradients_on_one_rank_skip_the_step_on_every_rank():
    """Contract: with 2 data-parallel ranks (PlainEngine with a dp_group, and ParallelEngine), infinite
    gradients on rank 1 alone at step 2 make BOTH ranks skip step 2 (weights unchanged, finite) and
    train again at step 3: the ranks agree, so their replicas stay identical."""
    from tests.distributed import run_distributed
    for out in run_distributed(_skip_dp2, 2):
        for kind in ("plain", "parallel"):
            assert out[kind] == {"flags": [False, True, False], "kept": True, "moved": True, "finite": True}, out


def test_nonfinite_weights_are_never_written_or_loaded(tmp_path):
    """Contract: check_finite refuses (FloatingPointError naming the tensor) to checkpoint weights or
    optimizer state holding NaN/Inf, and load_file refuses such a file (CheckpointError naming it),
    so a NaN checkpoint is neither made nor used; lr=1e30 (weights of 2e29 after one step) is
    rejected by the config."""
    from megaflow.train import check_finite

    class Engine:  # the engines' interface: what model.pt and the optimizer file would hold
        def __init__(self, model):
            self.model, self.optimizer = model, torch.optim.AdamW(model.parameters())

        def model_state_dict(self, copy=True):
            return self.model.state_dict()

    model = torch.nn.Linear(3, 2)
    cfg = load_config(str(TINY))
    check_finite(Engine(model), None, "cpu", 7, cfg, tmp_path)  # finite: no error
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"NaN/Inf in model.weight after step 7: no checkpoint is written"):
        check_finite(Engine(model), None, "cpu", 7, cfg, tmp_path)

    def write(d):
        torch.save(model.state_dict(), d / "model.pt")
    ck = save_checkpoint(tmp_path / "ck", 1, write)
    with pytest.raises(CheckpointError, match=r"model.pt holds NaN or Inf values \(in 'weight'\)"):
        load_file(ck, "model.pt")
    with pytest.raises(ConfigError, match=r"train.lr=1e\+30 must be in \(0, 1.0\]"):
        load_config(str(TINY), ["train.lr=1e30"])


# ----- case 4 -----------------------------------------------------------------------------------------
def test_fresh_run_into_a_run_directory_is_refused_without_resume_or_overwrite(tiny_run, tiny_sets, tmp_path):
    """Contract: a second run into an out_dir holding checkpoints, without --resume, exits 2 with one
    line naming --resume and --overwrite, and leaves the old checkpoints untouched; --overwrite
    starts over: afterwards the checkpoints are only the new run's (its history starts at step 1
    and ends at its own last step), and the user's own files in out_dir stay."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "notes.txt").write_text("mine")
    before = {p.name: (p / "meta.json").read_text() for p in list_checkpoints(out / "checkpoints")}
    assert list(before) == ["step_000030", "step_000060"]

    rc, err = _train(*train_args(tiny_sets, out, "train.steps=3", "train.save_every=1", "train.eval_data=")[1:])
    line = _one_error_line(err)
    assert rc == 2 and "already holds checkpoints" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: (p / "meta.json").read_text() for p in list_checkpoints(out / "checkpoints")} == before

    megaflow(*train_args(tiny_sets, out, "train.steps=3", "train.save_every=1", "train.eval_data="), "--overwrite")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000002", "step_000003"]
    hist = _load(resolve(out), "trainer.pt")["history"]
    assert resolve(out).name == "step_000003" and [h["step"] for h in hist] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"


# ----- case 5 -----------------------------------------------------------------------------------------
def test_bit_flip_in_a_checkpoint_file_is_caught(tiny_run, tmp_path):
    """Contract: one flipped bit inside model.pt's tensor data (size unchanged) fails validate and
    load_file with a CheckpointError naming model.pt and the checksum; find_latest / resolve skip the
    damaged checkpoint for the previous one, and loading it for generation by path fails clearly
    (it used to load weights of 1e37)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    newest = run / "checkpoints" / "step_000060"
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["format"] == 2 and meta["hash"] == "xxh3_128" and set(meta["checksums"]) == set(meta["files"])
    data = bytearray((newest / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0x40
    (newest / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.pt is corrupt.*xxh3_128.*meta.json says"):
        validate(newest)
    with pytest.raises(CheckpointError, match=r"cannot read model.pt"):
        load_file(newest, "model.pt")
    assert find_latest(run / "checkpoints").name == "step_000030" and resolve(run).name == "step_000030"
    from megaflow.inference import load_for_inference
    with pytest.raises(CheckpointError, match="model.pt is corrupt"):
        load_for_inference(newest)


# ----- case 6 -----------------------------------------------------------------------------------------
SAVER = """
import sys, time
from pathlib import Path
from megaflow.checkpoint import save_checkpoint
src, root, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = {p.name: p.read_bytes() for p in src.iterdir() if p.name != "meta.json"}
def write(d):
    for name, data in files.items():
        (d / name).write_bytes(data)
for step in range(100, 100 + n):
    save_checkpoint(root, step, write, keep_last=1)
    time.sleep(0.05)
"""


def test_generate_never_sees_a_checkpoint_vanish_while_a_run_saves(tiny_run, tmp_path):
    """Contract: while another process saves a checkpoint every ~0.05 s with keep_last=1 (the issue's
    `save_every=1` run), loading the run for generation succeeds every time; each commit keeps the
    checkpoint `latest` named before it (so with keep_last=1 two remain)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    root = run / "checkpoints"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(root / "step_000060"), str(root), "400"],
                             cwd=REPO, env=env)
    from megaflow.inference import load_for_inference
    try:
        while not (root / "step_000101").exists():  # the saver is running
            assert saver.poll() is None, "the saving process exited early"
            time.sleep(0.02)
        loaded = []
        for _ in range(12):
            assert saver.poll() is None, "the saving process ended before the loads did"
            loaded.append(load_for_inference(run)[3].name)
    finally:
        saver.kill()
        saver.wait()
    assert len(set(loaded)) > 1, f"all loads read one checkpoint {loaded}: the test did not load while saving"

    quiet = tmp_path / "quiet"
    for step in (1, 2, 3):
        save_checkpoint(quiet, step, lambda d: (d / "x.bin").write_bytes(b"x"), keep_last=1)
    assert [p.name for p in list_checkpoints(quiet)] == ["step_000002", "step_000003"]


# ----- case 7 -----------------------------------------------------------------------------------------
def test_bad_settings_and_files_exit_2_with_one_line(tiny_sets, tmp_path):
    """Contract: train.steps=-5 (it used to train nothing and exit 0), lr=-1 and lr=1e39, a YAML
    syntax error (naming the file and line), an empty or corrupt tokenizer file, and an out_dir
    that cannot be created each exit 2 with one line naming the value or file; nothing is trained."""
    out = tmp_path / "out"
    base = ["--config", TINY, *sum((["--set", s] for s in tiny_sets), []), "--set", f"train.out_dir={out}"]
    for setting, needle in (("train.steps=-5", "train.steps=-5 must be a positive number"),
                            ("train.lr=-1", "train.lr=-1.0 must be in (0, 1.0]"),
                            ("train.lr=1e39", "train.lr=1e+39 must be in (0, 1.0]")):
        rc, err = _train(*base, "--set", setting)
        assert rc == 2 and needle in _one_error_line(err), err
    assert not out.exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 5\n  lr: [3e-4\n")
    rc, err = _train("--config", bad)
    line = _one_error_line(err)
    assert rc == 2 and f"config file '{bad}' is not valid YAML" in line and f'"{bad}", line' in line

    for content in (b"", os.urandom(2000)):
        tok = tmp_path / "tok.model"
        tok.write_bytes(content)
        rc, err = _train(*base, "--set", f"data.tokenizer.path={tok}")
        line = _one_error_line(err)
        assert rc == 2 and f"cannot load the SentencePiece model '{tok}'" in line and "empty or corrupt" in line

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, err = _train(*base, "--set", f"train.out_dir={blocker}/run")
    line = _one_error_line(err)
    assert rc == 2 and f"train.out_dir='{blocker}/run' cannot be written" in line


def test_truncated_shard_exits_2_naming_the_shard(tiny_sets, tmp_path):
    """Contract: training on a copy of the data with a truncated shard exits 2 with one line naming
    the shard (the data pipeline's message), not a traceback."""
    data = tmp_path / "data"
    shutil.copytree(tiny_sets[0].split("=", 1)[1], data)
    shard = sorted(data.glob("shard.*.mds"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    res = megaflow(*train_args(tiny_sets, tmp_path / "out", f"data.local={data}", "train.steps=3",
                               "train.eval_data="), check=False)
    line = _one_error_line(res.stderr)
    assert res.returncode == 2 and shard.name in line


def test_full_disk_during_a_save_exits_2_and_keeps_older_checkpoints(tiny_run, tiny_sets, tmp_path):
    """Contract: a save that cannot be written (here a file-size limit below model.pt's size: torch
    fails with 'enforce fail ... unexpected pos', as on a full disk) exits 2 with one line naming the
    checkpoint directory and saying the earlier checkpoints are intact; they still validate, the
    half-written temporary directory is gone, and --resume later continues from the newest."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    limit = (run / "checkpoints" / "step_000060" / "model.pt").stat().st_size // 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "megaflow.cli", *map(str, train_args(tiny_sets, run, "train.steps=61",
                                                                                      "train.eval_data=")), "--resume"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    line = _one_error_line(res.stderr)
    root = run / "checkpoints"
    assert res.returncode == 2 and f"cannot write checkpoint step_000061 into '{root}'" in line
    assert "the earlier checkpoints are intact: step_000030, step_000060" in line
    assert [p.name for p in list_checkpoints(root)] == ["step_000030", "step_000060"]
    assert not list(root.glob(".tmp-*"))
    for ck in list_checkpoints(root):
        validate(ck)


# ----- case 8 -----------------------------------------------------------------------------------------
def test_dead_writers_latest_tmp_files_are_cleaned_up(tmp_path):
    """Contract: a `.latest.tmpPID` file left by a dead process (killed between writing and renaming
    `latest`) is removed by the next save; one of a live process is not."""
    root = tmp_path / "ck"
    save_checkpoint(root, 1, lambda d: (d / "x.bin").write_bytes(b"1"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    (root / f".latest.tmp{dead}").write_text("step_000001\n")
    (root / f".latest.tmp{os.getpid()}x").write_text("not ours\n")  # not the pattern: kept
    live = root / f".latest.tmp{os.getppid()}"
    live.write_text("step_000001\n")
    save_checkpoint(root, 2, lambda d: (d / "x.bin").write_bytes(b"2"))
    assert not (root / f".latest.tmp{dead}").exists()
    assert live.exists() and (root / f".latest.tmp{os.getpid()}x").exists()
    assert (root / "latest").read_text() == "step_000002\n"
