"""launchers/: the SLURM and local launch scripts.

Contract:
- every script passes `bash -n`;
- inside a (faked) 2-node allocation, launchers/slurm.sbatch -> slurm_train.sh with DRY_RUN=1
  prints one srun line (one task per node, kill on bad exit; the task ignores SIGUSR1 and takes
  its node rank from SLURM_NODEID) whose torchrun part parses with torchrun's own argument parser
  into: 2 nodes x the GPUs of --gpus-per-node=h200:4, static rendezvous at the first host
  `scontrol show hostnames` gives, on a port derived from the job id, each worker run by
  launchers/slurm_rank.sh with `train --config CONFIG --resume` + the user's arguments (quoted values
  intact); NCCL_NVLS_ENABLE=0 is exported unless the environment sets it;
- a GPU-less allocation (no GPU gres, no nvidia-smi) takes the CPU path: NPROC_PER_NODE workers
  (default 1), DS_ACCELERATOR=cpu, the task's cores as OMP threads (no division by zero);
- submitted from outside the repository (sbatch runs a spool copy), slurm.sbatch finds the repository
  through the submitted script's path (`scontrol show job`), and says what to do when it cannot;
- a --time that leaves less than SIGNAL_LEAD + MIN_WORK_S is refused (exit 2) with the --time to give;
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
SCRIPTS = ["launchers/slurm.sbatch", "launchers/slurm_train.sh", "launchers/slurm_rank.sh", "launchers/local.sh",
           "tools/slurm_local.sh"]


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
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # no GPU here, whatever this machine has
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_", "MASTER_", "GPUS_PER", "NPROC_PER", "OMP_", "DS_ACC", "SIGNAL_"))}
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
    assert exports["DS_ACCELERATOR"] == "cuda"
    cmd, a = srun_and_torchrun(lines[-1])
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL"]
    assert "trap \"\" USR1" in cmd[7] and "PET_NODE_RANK=$SLURM_NODEID" in cmd[7]
    assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.max_restarts) == ("2", "4", "static", 0)
    assert (a.master_addr, a.master_port) == ("gpu-a07", 20000 + 123456 % 20000)
    assert a.no_python and a.training_script == str(REPO / "launchers" / "slurm_rank.sh")
    assert a.training_script_args == ["train", "--config", str(REPO / "configs" / "tiny.yaml"), "--resume",
                                      "--set", "train.out_dir=runs/my run"]
    kept = run(["bash", "launchers/slurm_train.sh"], {**slurm_env, "NCCL_NVLS_ENABLE": "1", "MASTER_PORT": "29999"})
    assert "export NCCL_NVLS_ENABLE=1" in kept.stdout and "--master_port 29999" in kept.stdout


def srun_and_torchrun(line: str):
    """The printed srun line as a list, and its torchrun arguments parsed by torchrun's parser."""
    cmd = shlex.split(line)
    i = next(k for k, a in enumerate(cmd) if a.endswith("torchrun"))
    return cmd, torchrun_args(cmd[i + 1:])


def test_slurm_cpu_path_and_submit_from_anywhere(slurm_env, tmp_path):
    """No GPU gres and no GPU: 1 CPU worker per node (or NPROC_PER_NODE), DS_ACCELERATOR=cpu; run as
    sbatch's spool copy from a directory outside the repo, found through `scontrol show job`."""
    spool = tmp_path / "spool" / "slurm_script"
    spool.parent.mkdir()
    spool.write_text((REPO / "launchers" / "slurm.sbatch").read_text())
    scontrol = Path(slurm_env["PATH"].split(":")[0]) / "scontrol"
    scontrol.write_text('#!/bin/sh\ncase "$1 $2" in\n"show hostnames") printf "cpu-01\\ncpu-02\\n";;\n'
                        f'"show job") echo "   Command=../launchers/slurm.sbatch";;\nesac\n')
    env = {k: v for k, v in slurm_env.items() if k != "SLURM_GPUS_PER_NODE"}
    env.update(SLURM_SUBMIT_DIR=str(REPO / "configs"), SLURM_CPUS_PER_TASK="6")  # a directory in the repo
    r = run(["bash", str(spool)], env, check=False)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "export DS_ACCELERATOR=cpu" in out and "export OMP_NUM_THREADS=6" in out
    cmd, a = srun_and_torchrun(out.strip().splitlines()[-1])
    assert a.nproc_per_node == "1" and a.training_script == str(REPO / "launchers" / "slurm_rank.sh")
    out = run(["bash", str(spool)], {**env, "NPROC_PER_NODE": "3"}, check=True).stdout
    assert srun_and_torchrun(out.strip().splitlines()[-1])[1].nproc_per_node == "3" and "OMP_NUM_THREADS=2" in out
    scontrol.write_text('#!/bin/sh\nexit 1\n')
    r = run(["bash", str(spool)], {**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, check=False)
    assert r.returncode == 2 and "cannot find the megaflow repository" in r.stderr and "MEGAFLOW_ROOT" in r.stderr


def test_slurm_refuses_a_time_limit_shorter_than_the_signal_lead(slurm_env):
    squeue = Path(slurm_env["PATH"].split(":")[0]) / "squeue"
    squeue.write_text('#!/bin/sh\necho "$LIMIT"\n')
    squeue.chmod(0o755)
    r = run(["bash", "launchers/slurm_train.sh"], {**slurm_env, "LIMIT": "4:00"}, check=False)
    assert r.returncode == 2 and "--time=4min" in r.stderr and "--time >= 10" in r.stderr
    for ok in ({"LIMIT": "10:00"}, {"LIMIT": "1-00:00:00"}, {"LIMIT": "UNLIMITED"},
               {"LIMIT": "4:00", "SIGNAL_LEAD": "60", "MIN_WORK_S": "120"}):
        assert run(["bash", "launchers/slurm_train.sh"], {**slurm_env, **ok}, check=False).returncode == 0, ok


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


def test_docs_give_the_sbatch_lines_the_real_slurm_test_runs():
    """README and docs/ARCHITECTURE.md show the CPU line tests/launchers/test_slurm_real.py submits
    (its script path and out_dir as placeholders) and the GPU line beside it."""
    import re
    from tests.launchers.test_slurm_real import CPU_SBATCH
    cpu = CPU_SBATCH.format(script="/path/to/megaflow/launchers/slurm.sbatch", out="runs/tiny")
    gpu = "sbatch --nodes=2 --gpus-per-node=8 --cpus-per-task=64 --time=24:00:00 --export=ALL,CONFIG="
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        text = re.sub(r"\s*\\\n\s*", " ", (REPO / doc).read_text())  # join continued lines
        assert cpu in text and gpu in text, doc
