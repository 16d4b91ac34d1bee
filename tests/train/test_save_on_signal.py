"""Save on signal (megaflow/stop.py, the loop in megaflow/train.py) and the collective timeout
(parallel.timeout_s, parallel/runtime.py), on configs/tiny.yaml on CPU.

Contract:
- SIGUSR1, then (after a resume) SIGTERM, mid-run: the run saves a checkpoint at the next step
  boundary (a step save_every would not give), exits 0 with result.json `stopped`, and `--resume`
  continues from exactly there: the loss history equals an uninterrupted run's (== on floats);
- a signal during start-up stops the run before its first step, saving nothing new; the second such
  stop in a row fails with exit 2 and a message that names --time (no endless requeue);
- a rank launched without torchrun whose peer never starts fails after parallel.timeout_s with a
  message, instead of waiting 30 minutes;
- under torchrun, a rank stopped with SIGSTOP makes the other fail after parallel.timeout_s (torchrun
  then ends the stopped one).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.forked import run_python
from tests.train.conftest import REPO, megaflow, train_args

SIGNAL_AT_START = """
import os, signal, sys
from megaflow import stop, train
install = stop.StopSignals.install
def signalled_install(self):
    out = install(self)
    os.kill(os.getpid(), signal.SIGUSR1)  # arrives during start-up, before any step
    return out
stop.StopSignals.install = signalled_install
sys.exit(train.main(sys.argv[1:]))
"""
SETS = ["train.save_every=0", "train.eval_data=", "train.log_every=1", "train.steps=16"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _history(out: Path, step: int) -> list:
    trainer = torch.load(out / "checkpoints" / f"step_{step:06d}" / "trainer.pt", weights_only=False)
    return [(h["step"], h["loss"]) for h in trainer["history"]]


def _signal_at(args: list, at_step: int, sig: int) -> tuple:
    """Run `megaflow ARGS`, send `sig` once step `at_step` is logged; (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "megaflow.cli", *map(str, args)], cwd=REPO, env=_env(),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if f"step {at_step} loss" in line:
                proc.send_signal(sig)
                break
        seen += proc.stderr.readlines()
        return proc.wait(timeout=120), "".join(seen)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_signals_save_at_the_next_step_and_resume_exactly(tiny_sets, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    megaflow(*train_args(tiny_sets, whole, *SETS))
    reference = _history(whole, 16)

    rc, err = _signal_at(train_args(tiny_sets, split, *SETS), 3, signal.SIGUSR1)
    assert rc == 0, err[-3000:]
    result = json.loads((split / "result.json").read_text())
    k1 = result["steps"]
    assert result["stopped"] == "SIGUSR1" and 3 <= k1 < 16, result
    assert (split / "checkpoints" / f"step_{k1:06d}" / "meta.json").is_file()  # save_every=0: the signal's save
    assert json.loads((split / "stops.json").read_text()) == {"step": k1, "signal": "SIGUSR1", "idle_stops": 0}

    rc, err = _signal_at([*train_args(tiny_sets, split, *SETS), "--resume"], k1 + 2, signal.SIGTERM)
    assert rc == 0 and f"at step {k1}" in err, err[-3000:]
    k2 = json.loads((split / "result.json").read_text())["steps"]
    assert k1 + 2 <= k2 < 16 and "SIGTERM: stopped at step" in err

    assert _history(split, k2) == reference[:k2]  # the same loss at every step across both stops


def test_signalled_during_start_up_twice_is_an_error(tiny_sets, tmp_path):
    out = tmp_path / "run"
    args = [*train_args(tiny_sets, out, *SETS)[1:], "--resume"]  # without the "train" word: train.main
    first = run_python(["-c", SIGNAL_AT_START, *args], REPO, _env(), timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["steps"] == 0
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert json.loads((out / "stops.json").read_text())["idle_stops"] == 1
    second = run_python(["-c", SIGNAL_AT_START, *args], REPO, _env(), timeout=120)
    assert second.returncode == 2
    assert "stopped the run 2 times in a row before it made a single step" in second.stderr
    assert "--time" in second.stderr and "stops.json" in second.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_whose_peer_never_starts_fails_after_the_timeout(tiny_sets, tmp_path):
    """As srun starts each rank without torchrun: rank 0 of 2 alone, parallel.timeout_s=3."""
    env = dict(_env(), SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    t0 = time.time()
    r = run_python(["-m", "megaflow.cli", *train_args(tiny_sets, tmp_path / "run", *SETS, "parallel.timeout_s=3")],
                   REPO, env, timeout=120)
    assert r.returncode not in (0, 2) and time.time() - t0 < 60, r.stderr[-2000:]
    assert "parallel.timeout_s=3" in r.stderr and "did not all join" in r.stderr


def test_a_stopped_rank_ends_the_others_within_the_timeout(tiny_sets, tmp_path):
    """torchrun, 2 CPU ranks, parallel.timeout_s=4: SIGSTOP rank 1 at step 4; rank 0 fails in time
    (every group's collectives, the data-parallel group's too, wait parallel.timeout_s, not 30 min)."""
    args = ["--standalone", "--nproc_per_node", "2", "-m", "megaflow.cli",
            *train_args(tiny_sets, tmp_path / "run", *SETS[:3], "train.steps=400", "parallel.timeout_s=4")]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *map(str, args)], cwd=REPO,
                            env=dict(_env(), OMP_NUM_THREADS="1"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    stopped = None
    try:
        for line in proc.stderr:
            if "step 4 loss" in line:
                stopped = _worker_pid(proc.pid, local_rank=1)
                os.kill(stopped, signal.SIGSTOP)
                t0 = time.time()
                break
        assert stopped, "the run did not reach step 4"
        failed = next((line for line in proc.stderr if "Timed out" in line or "timed out" in line), "")
        waited = time.time() - t0
        assert "rank0" in failed and waited < 4 + 20, (waited, failed)  # 4 s, and room for a loaded machine
        _end(stopped)  # torchrun would wait 30 s (its shutdown timeout) before it kills the stopped rank
        assert proc.wait(timeout=120) != 0
    finally:
        if stopped:
            _end(stopped)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _end(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _worker_pid(agent: int, local_rank: int) -> int:
    for pid in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under torchrun {agent}")
