"""tools/bench_zero.py runs under torchrun on CPU (gloo, tiny config) and measures what ZeRO-1 saves.

Contract: it prints the table and writes JSON with a row without ZeRO and a ZeRO-1 row; at DP=2 the
ZeRO-1 rank holds 12/2 = 6 bytes of optimizer state per trainable parameter (fp32 master + moments,
halved) against 8 (moments) without ZeRO (within 5%), and both rows (fp32, same weights and batch)
report the same first loss (1e-5).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.parallel.test_zero import deepspeed_ops  # noqa: F401 (fixture: compile DeepSpeed's op once)

ROOT = Path(__file__).resolve().parents[2]


def test_bench_zero_cpu_gloo(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tools" / "bench_zero.py"), "--device", "cpu", "--tiny", "--stages", "0,1", "--steps", "1",
           "--warmup", "0", "--dtype", "fp32", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ZeRO-1 |" in proc.stdout and "| none |" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    plain, zero1 = result["rows"]
    assert result["dp"] == 2 and (plain["stage"], zero1["stage"]) == (0, 1)
    n = plain["trainable_params_M"] * 1e6
    assert abs(plain["optimizer_state_bytes"] / n - 8) < 0.4, plain
    assert abs(zero1["optimizer_state_bytes"] / n - 6) < 0.3, zero1
    assert abs(zero1["first_loss"] - plain["first_loss"]) < 1e-5, (plain, zero1)
