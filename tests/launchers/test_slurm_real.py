"""launchers/slurm.sbatch on a real SLURM: a private slurmctld + munged + two slurmd on this machine
(tools/slurm_local.sh; the packages come from tools/setup_env.sh), configs/tiny.yaml on 2 nodes x 1
CPU worker (gloo), submitted with the documented CPU sbatch line from a directory outside the repo.

Contract (one job, then a resubmission; an uninterrupted job of the same run beside it):
- `scancel --signal=USR1 --batch` (what --signal=B:USR1@N sends): every rank saves at the same step
  boundary (a step no save_every would give), the job requeues itself and resumes from that step;
- `scontrol requeue` (SIGTERM to every process, as at preemption): the same, SLURM requeueing;
- the run crosses a data epoch with a checkpoint exactly at its end (save_every = the epoch's steps);
- a rank killed with -9 after that checkpoint ends the job (FAILED, not requeued: FAILURE_REQUEUES=0)
  within seconds; resubmitting the same command resumes from the epoch-end checkpoint and finishes;
- the loss history at the end equals the uninterrupted job's, step for step (== on floats);
- per-rank logs are LOG_DIR/<job>/<node>.rank<R>.log.
It needs root and apt-get (or SLURM installed); elsewhere it skips with the reason. Every daemon it
starts is stopped at the end, also when it fails.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launchers" / "slurm.sbatch"
# The CPU line of the docs (README, docs/ARCHITECTURE.md "Launching and tools"), with the test's paths.
CPU_SBATCH = ("sbatch --nodes=2 --cpus-per-task=2 --time=15 "
              "--export=ALL,CONFIG=configs/tiny.yaml,NPROC_PER_NODE=1 {script} --set train.out_dir={out}")


def _why_not() -> str:
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    if all(shutil.which(p, path=path) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and this is not root with apt-get (tools/setup_env.sh installs it as root)"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")


def _free_port_block() -> int:
    """A port p with p, p+1, p+2 free (slurmctld and the two slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 60000 and all(_free(q) for q in (p + 1, p + 2)):
            return p
    raise RuntimeError("no three free ports in a row")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def slurm():
    """A running private SLURM; yields the environment that talks to it. Its directory is not under
    pytest's tmp_path: munged wants every directory above its socket open to all (0755)."""
    base = Path(tempfile.mkdtemp(prefix="megaflow-slurm-"))
    base.chmod(0o755)
    env = dict(os.environ, SLURM_LOCAL_PORT=str(_free_port_block()))
    try:
        up = subprocess.run(["bash", str(REPO / "tools/slurm_local.sh"), "up", str(base)], env=env,
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "SLURM_CONF": str(base / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(REPO / "tools/slurm_local.sh"), "down", str(base)], env=env,
                       capture_output=True, text=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


class Job:
    """One submission of the documented CPU line, from `where` (outside the repo)."""

    def __init__(self, env: dict, where: Path, out: Path, sets: list, extra_env: str = ""):
        cmd = shlex.split(CPU_SBATCH.format(script=SCRIPT, out=out))
        cmd[1:1] = ["--parsable"]
        if extra_env:
            cmd = [a + "," + extra_env if a.startswith("--export=") else a for a in cmd]
        for s in sets:
            cmd += ["--set", s]
        r = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        self.id, self.env, self.log = r.stdout.strip().split(";")[0], env, where / f"megaflow-{r.stdout.strip()}.out"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def show(self) -> dict:
        r = subprocess.run(["scontrol", "show", "job", self.id], env=self.env, capture_output=True, text=True)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def wait_for(self, pattern: str, timeout: float = 120, after: int = 0) -> re.Match:
        """The first match of `pattern` in the job log past character `after`."""
        end = time.time() + timeout
        while time.time() < end:
            m = re.compile(pattern).search(self.text(), after)
            if m:
                return m
            if self.show().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                break
            time.sleep(0.2)
        raise AssertionError(f"job {self.id}: no {pattern!r} in {timeout} s; state {self.show().get('JobState')}; "
                             f"log:\n{self.text()[-4000:]}")

    def wait_end(self, timeout: float = 180) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            info = self.show()
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                return info
            time.sleep(0.3)
        raise AssertionError(f"job {self.id} still {self.show().get('JobState')} after {timeout} s:\n"
                             f"{self.text()[-4000:]}")


def _epoch_steps(sets: list) -> int:
    """Batches rank 0 reads in the first epoch with 2 data-parallel ranks."""
    from data_pipeline.loader import build_loader
    from megaflow.config import load_config
    from megaflow.train import load_run_tokenizer, prepare_data
    cfg = load_config(str(REPO / "configs/tiny.yaml"), sets)
    prepare_data(cfg)
    tok = load_run_tokenizer(cfg)
    counts = []
    for rank in (0, 1):
        with build_loader(cfg.data, tok, rank, 2) as loader:
            counts.append(sum(1 for _ in loader))
    assert counts[0] == counts[1], counts
    return counts[0]


def _history(out: Path) -> list:
    from megaflow.checkpoint import find_latest
    ckpt = find_latest(out / "checkpoints")
    return [(h["step"], h["loss"]) for h in torch.load(ckpt / "trainer.pt", weights_only=False)["history"]]


def _kill_rank(job: Job, log_dir: Path, rank: int) -> None:
    """SIGKILL the python of global rank `rank` (its wrapper's pid is in its log's newest header)."""
    log = next((log_dir / job.id).glob(f"*.rank{rank}.log"))
    wrapper = re.findall(r"pid (\d+)", log.read_text())[-1]
    children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
    py = [c for c in children if "python" in Path(f"/proc/{c}/comm").read_text()]
    assert py, f"no python under the rank-{rank} wrapper {wrapper}"
    os.kill(int(py[0]), signal.SIGKILL)


def test_preempt_requeue_resume_and_a_killed_rank(slurm, tmp_path):
    data = tmp_path / "digits"
    sets = [f"data.local={data}/train", f"data.tokenizer.path={data}/tok.model", "train.eval_data=",
            "train.dataset_limit=300", "train.report=false", "train.log_every=1", "train.keep_last=3"]
    epoch = _epoch_steps(sets)
    steps = epoch + 8
    sets += [f"train.steps={steps}", f"train.save_every={epoch}"]
    assert epoch >= 12, f"an epoch of {epoch} steps leaves no room for two signals before its end"
    where, logs = tmp_path / "submit", tmp_path / "logs"
    where.mkdir()
    env = {**slurm, "PATH": os.environ["PATH"]}
    ref = Job(env, where, tmp_path / "ref", sets, f"LOG_DIR={logs}")
    out = tmp_path / "run"
    job = Job(env, where, out, sets, f"LOG_DIR={logs},FAILURE_REQUEUES=0")

    job.wait_for(r"step 3 loss")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=env, check=True)
    k1 = int(job.wait_for(r"SIGUSR1: stopped at step (\d+) with a checkpoint").group(1))
    m = job.wait_for(rf"resumed from \S+step_0*{k1} at step {k1}")
    job.wait_for(rf"step {k1 + 2} loss", after=m.end())
    subprocess.run(["scontrol", "requeue", job.id], env=env, check=True)
    k2 = int(job.wait_for(r"SIGTERM: stopped at step (\d+) with a checkpoint").group(1))
    m = job.wait_for(rf"resumed from \S+step_0*{k2} at step {k2}")
    assert 3 <= k1 < k2 < epoch, (k1, k2, epoch)  # both saves came from the signals, not from save_every
    job.wait_for(rf"step {epoch + 2} loss", after=m.end())
    assert (out / "checkpoints" / f"step_{epoch:06d}").is_dir()
    _kill_rank(job, logs, 1)
    t_kill = time.time()
    info = job.wait_end(timeout=90)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "2", info
    assert time.time() - t_kill < 45, "the job outlived a killed rank"
    assert "not requeued" in job.text()

    again = Job(env, where, out, sets, f"LOG_DIR={logs}")
    again.wait_for(rf"resumed from \S+step_0*{epoch} at step {epoch}")  # the checkpoint at the epoch's end
    assert again.wait_end()["JobState"] == "COMPLETED", again.text()[-3000:]
    assert ref.wait_end()["JobState"] == "COMPLETED", ref.text()[-3000:]
    ref_history = _history(tmp_path / "ref")
    assert [s for s, _ in ref_history] == list(range(1, steps + 1))
    assert _history(out) == ref_history  # the same loss at every step, == on floats

    names = sorted(p.name for p in (logs / job.id).glob("*.log"))
    assert len(names) == 2 and {re.fullmatch(r"(n[12])\.rank([01])\.log", n).group(2) for n in names} == {"0", "1"}
