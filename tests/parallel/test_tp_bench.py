"""tools/bench_tp.py runs under torchrun: its TP-vs-TP=1 check passes and it prints the table.

Contract: on CPU (gloo, tiny config) always; on CUDA with NCCL and the ~265M-parameter
configs/bench_tp.yaml when two GPUs are present (the lent GPU machine), where the equality check
must pass too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_bench(tmp_path, *args, timeout=300):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools" / "bench_tp.py"), "--check", "--json", str(out), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check passed" in proc.stdout and "TP=2+SP" in proc.stdout, proc.stdout
    return json.loads(out.read_text()), proc.stdout


def test_bench_tp_cpu_gloo(tmp_path):
    result, _ = run_bench(tmp_path, "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1")
    assert result["check"] and [r["name"] for r in result["rows"]] == ["TP=1", "TP=2", "TP=2+SP"]
    tp1, tp2 = result["rows"][0], result["rows"][1]
    assert tp2["params_per_rank_M"] < tp1["params_per_rank_M"]  # the weights really are split


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_bench_tp_cuda_nccl(tmp_path):
    result, stdout = run_bench(tmp_path, "--device", "cuda", "--config", str(ROOT / "configs" / "bench_tp.yaml"),
                               timeout=600)
    print(stdout)
    tp1, tp2 = result["rows"][0], result["rows"][1]
    assert tp2["peak_mem_GiB"] < tp1["peak_mem_GiB"]
