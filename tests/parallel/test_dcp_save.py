"""Sharded saves that die midway, and asynchronous saves, on 2 real gloo processes (DP2, no ZeRO).

Contract:
- killed: both ranks commit a checkpoint at step 1, train a step, and are killed (os._exit) while
  writing the step-2 checkpoint, after their shard files are half written and before meta.json.
  The step-1 checkpoint stays complete and `latest`; `find_latest` skips the half-written
  directory; the step-1 checkpoint loads in one process with the weights the ranks had at step 1.
- async: `AsyncSave.start` at step 2 returns before the checkpoint is committed (`latest` still
  names step 1), the ranks train step 3 while it is written, `finish` commits it; it holds the
  step-2 weights and optimizer state (a fresh engine loads it and repeats step 3's loss exactly),
  not the step-3 ones; loaded weights-only (train.init_from) it gives the step-2 weights and a
  fresh optimizer.
- checksums: every rank hashes its state files as it writes them (no file is read back to hash it
  at the commit), and meta.json's checksums are those of the files on disk (validate passes).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from megaflow.checkpoint import find_latest, validate
from parallel.topology import Topology
from tests.distributed import run_distributed, start_ranks
from tests.parallel.test_dcp_reshard import build, config, run_steps


def _save(root: Path, step: int, engine, topo):
    from parallel.checkpoint import FORMAT, save_distributed, save_engine_state
    return save_distributed(root, step, lambda d: save_engine_state(engine, d, topo), 5, topo, {"sharded": FORMAT})


def _killed(rank, world, root):
    import torch.distributed.checkpoint as dcp
    root, cfg, topo = Path(root), config(), Topology()
    engine = build(cfg, topo, seed=0)
    run_steps(engine, cfg, topo, range(1))
    _save(root, 1, engine, topo)
    if rank == 0:
        torch.save(engine.model_state_dict(), root / "weights_at_1.pt")
    run_steps(engine, cfg, topo, range(1, 2))
    write_data = dcp.FileSystemWriter.write_data

    def dying(self, plan, planner):
        write_data(self, plan, planner).wait()
        for f in Path(self.path).glob("*.distcp"):
            os.truncate(f, f.stat().st_size // 2)
        os._exit(9)
    dcp.FileSystemWriter.write_data = dying
    _save(root, 2, engine, topo)
    return "not killed"


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    procs, queue = start_ranks(_killed, 2, str(root))
    deadline = time.time() + 240
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.terminate()
    assert queue.empty() and codes == [9, 9], (codes, None if queue.empty() else queue.get())

    left = list(root.glob(".tmp-step_000002-*"))
    assert len(left) == 1 and list(left[0].glob("state/*.distcp")) and not (left[0] / "meta.json").exists()
    assert (root / "latest").read_text().strip() == "step_000001"
    assert find_latest(root) == root / "step_000001"

    from megaflow.model.starflow import build_model
    from megaflow.train import PlainEngine
    from parallel.checkpoint import load_engine_state
    cfg = config()
    engine = PlainEngine(build_model(cfg.model, seed=5), cfg, None)
    assert load_engine_state(engine, root / "step_000001") == 1
    want = torch.load(root / "weights_at_1.pt")
    got = engine.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def _async(rank, world, root):
    import megaflow.checkpoint
    from parallel.checkpoint import AsyncSave, load_engine_state
    hashed, file_digest = [], megaflow.checkpoint.file_digest
    megaflow.checkpoint.file_digest = lambda path: hashed.append(Path(path).name) or file_digest(path)
    root, cfg, topo = Path(root), config(), Topology()
    engine = build(cfg, topo, seed=0)
    run_steps(engine, cfg, topo, range(1))
    _save(root, 1, engine, topo)
    run_steps(engine, cfg, topo, range(1, 2))
    at_2 = {k: v.clone() for k, v in engine.model_state_dict().items()}
    saver = AsyncSave(topo)
    saver.start(root, 2, engine, lambda d: (d / "note.txt").write_text("rest") if rank == 0 else None, 5)
    latest_during = (root / "latest").read_text().strip()
    step3 = run_steps(engine, cfg, topo, range(2, 3))
    path = saver.finish()
    fresh = build(cfg, topo, seed=3)
    load_engine_state(fresh, path, topo)
    same = all(torch.equal(fresh.model_state_dict()[k], v) for k, v in at_2.items())
    again = run_steps(fresh, cfg, topo, range(2, 3))
    init = build(cfg, topo, seed=4)  # train.init_from: the weights only, a fresh optimizer
    assert load_engine_state(init, path, topo, weights_only=True) == 0 and not init.optimizer.state
    same = same and all(torch.equal(init.model_state_dict()[k], v) for k, v in at_2.items())
    return {"latest_during": latest_during, "latest_after": (root / "latest").read_text().strip(),
            "same_weights": same, "step3": step3, "again": again, "note": (path / "note.txt").is_file(),
            "hashed_at_commit": hashed}


def test_async_save_overlaps_the_next_step_and_holds_the_saved_step(tmp_path):
    out = run_distributed(_async, 2, str(tmp_path))
    for r in out:
        assert r["latest_during"] == "step_000001" and r["latest_after"] == "step_000002", r
        assert r["same_weights"] and r["note"], r
        assert r["again"] == r["step3"], r
    # the state files were hashed as they were written (each rank its own): the commit read back only
    # rank 0's small files, and the recorded checksums are those of the files on disk
    assert out[0]["hashed_at_commit"] == ["note.txt"], out[0]["hashed_at_commit"]
    for step in (1, 2):
        meta = validate(tmp_path / f"step_{step:06d}")
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= {Path(k).name for k in meta["checksums"]}
