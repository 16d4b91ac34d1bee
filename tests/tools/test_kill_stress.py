"""The kill -9 stress test of checkpoints, short: 20 trials of tools/kill_stress.py (a writer saving a
checkpoint after every step, SIGKILLed at a random moment, most often inside a save). The long
version (`python tools/kill_stress.py --trials 60`) is recorded in docs/benchmarks.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.train.conftest import REPO


def test_kill9_during_saves_never_leaves_an_accepted_corrupt_checkpoint(tmp_path):
    """Contract: over 20 kills, 0 checkpoints that validate() accepts fail to load or differ from the
    uninterrupted run (bit for bit), find_latest is always the newest completed save, every resume
    continues bit-exactly (a last uninterrupted writer ends equal to the reference), the dead
    writers' leftovers are cleaned up, and some kills really landed inside a save."""
    res = subprocess.run([sys.executable, "tools/kill_stress.py", "--trials", "20", "--dir", str(tmp_path),
                          "--seed", "1"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stats = json.loads(res.stdout)
    assert stats["errors"] == [] and stats["corrupt_accepted"] == 0
    assert stats["trials"] == 20 and stats["accepted"] >= 20 and stats["killed_mid_save"] >= 3
    assert stats["steps"] > 20
