"""launchers/: the SLURM and local launch scripts.

Contract:
- every script passes `bash -n`;
- inside a (faked) 2-node allocation, launchers/slurm.sbatch -> slurm_train.sh with DRY_RUN=1
  prints one srun line (one task per node, kill on bad exit) whose torchrun part parses with
  torchrun's own argument parser into: 2 nodes x the GPUs of --gpus-per-node=h200:4, c10d
  rendezvous at the first host `scontrol show hostnames` gives, on a port derived from the job id,
  rendezvous id = job id, module megaflow.cli, arguments `train --config CONFIG --resume` + the
  user's (quoted values intact); NCCL_NVLS_ENABLE=0 is exported unless the environment sets it;
- outside an allocation, or with a missing CONFIG, slurm_train.sh fails with a message;
- launchers/local.sh N with DRY_RUN=1 prints a torchrun line that torchrun's parser accepts
  (standalone, N processes, megaflow.cli train + the arguments); a bad N exits 2 with usage; and a
  real `local.sh 1` run of configs/tiny.yaml for 2 steps writes a complete checkpoint.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["launchers/slurm.sbatch", "launchers/slurm_train.sh", "launchers/local.sh"]


def torchrun_args(argv: list):
    from torch.distributed.run import get_args_parser
    return get_args_parser().parse_args(argv)


def run(cmd: list, env: dict, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=check)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0


@pytest.fixture
def slurm_env(tmp_path) -> dict:
    """A fake 2-node allocation: SLURM_* variables and an `scontrol` that lists two hosts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a07\\ngpu-a08\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "GPUS_PER"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", DRY_RUN="1", SLURM_JOB_ID="123456", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_GPUS_PER_NODE="h200:4", SLURM_CPUS_ON_NODE="64",
               SLURM_SUBMIT_DIR=str(REPO), CONFIG="configs/tiny.yaml")
    return env


def test_slurm_dry_run_builds_the_torchrun_command(slurm_env):
    out = run(["bash", "launchers/slurm.sbatch", "--set", "train.out_dir=runs/my run"], slurm_env).stdout
    lines = out.strip().splitlines()
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    assert exports["MASTER_ADDR"] == "gpu-a07" and exports["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert exports["NCCL_NVLS_ENABLE"] == "0" and exports["OMP_NUM_THREADS"] == "16"
    cmd = shlex.split(lines[-1])
    i = next(k for k, a in enumerate(cmd) if a.endswith("torchrun"))
    assert cmd[:i] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    a = torchrun_args(cmd[i + 1:])
    assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_id) == ("2", "4", "c10d", "123456")
    assert a.rdzv_endpoint == f"gpu-a07:{20000 + 123456 % 20000}" and a.max_restarts == 0
    assert a.module and a.training_script == "megaflow.cli"
    assert a.training_script_args == ["train", "--config", "configs/tiny.yaml", "--resume",
                                      "--set", "train.out_dir=runs/my run"]
    kept = run(["bash", "launchers/slurm_train.sh"], {**slurm_env, "NCCL_NVLS_ENABLE": "1", "MASTER_PORT": "29999"})
    assert "export NCCL_NVLS_ENABLE=1" in kept.stdout and "gpu-a07:29999" in kept.stdout


def test_slurm_errors(slurm_env):
    env = {k: v for k, v in slurm_env.items() if k != "SLURM_JOB_ID"}
    r = run(["bash", "launchers/slurm_train.sh"], env, check=False)
    assert r.returncode != 0 and "not inside a SLURM allocation" in r.stderr
    r = run(["bash", "launchers/slurm_train.sh"], {**slurm_env, "CONFIG": "configs/nope.yaml"}, check=False)
    assert r.returncode == 2 and "CONFIG=configs/nope.yaml does not exist" in r.stderr


def test_local_dry_run_and_a_real_one_process_run(tmp_path):
    env = {**os.environ, "DRY_RUN": "1"}
    out = run(["bash", "launchers/local.sh", "3", "--config", "configs/tiny.yaml", "--set", "train.steps=2"], env)
    cmd = shlex.split(out.stdout.strip().splitlines()[-1])
    assert cmd[0].endswith("torchrun")
    a = torchrun_args(cmd[1:])
    assert a.standalone and a.nproc_per_node == "3" and a.training_script == "megaflow.cli" and a.module
    assert a.training_script_args == ["train", "--config", "configs/tiny.yaml", "--set", "train.steps=2"]
    for bad in (["0"], ["two"], []):
        r = run(["bash", "launchers/local.sh", *bad], env, check=False)
        assert r.returncode == 2 and "usage: launchers/local.sh N" in r.stderr, bad

    env.pop("DRY_RUN")
    r = run(["bash", "launchers/local.sh", "1", "--config", "configs/tiny.yaml", "--set", "train.steps=2",
             "--set", f"train.out_dir={tmp_path}", "--set", "train.report=false", "--set", "train.eval_data="],
            env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step_000002" / "meta.json").is_file()
