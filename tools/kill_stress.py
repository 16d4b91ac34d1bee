"""Kill -9 stress test of megaflow checkpoints (megaflow/checkpoint.py), on CPU.

    python tools/kill_stress.py --trials 50 [--dir DIR] [--seed 0]

Each trial forks a writer that trains a small MLP (AdamW; the batch of step s is drawn from a
generator seeded by s) and saves a checkpoint with `save_checkpoint` after EVERY step (keep_last=2),
resuming from `find_latest()` when there is one; after a random delay it is killed with SIGKILL.
Saving dominates a step (~9 MB of files written, checksummed and renamed against ~1 ms of compute),
so most kills land inside a save: in `write`, meta.json, the rename, `latest` or pruning. Then:

  corrupt accepted   every step_* directory that `validate()` accepts must load (`load_file` of
                     each file) and hold exactly (torch.equal, via a digest of every byte) the weights
                     and optimizer state of an uninterrupted reference run at that step;
  resume target      `find_latest()` must be the newest checkpoint whose save completed: the writer
                     reports each step after `save_checkpoint` returned, and a kill between the
                     rename and that report allows one step more;
  continuation       the next trial resumes from it, so every trial's checkpoints also check that
                     training continued bit-exactly; a last writer runs uninterrupted to the end and
                     its final checkpoint must equal the reference; the dead writers' leftovers
                     (.tmp-step_*, .del-step_*, .latest.tmpPID) must be gone after it.

Writers are forked from this process (one `import torch` for all trials; torch runs on one thread
here, so no OpenMP pool exists at fork time). Prints a JSON summary; exit 1 if any check failed.
tests/tools/test_kill_stress.py runs 20 trials; docs/benchmarks.md records a long run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.checkpoint import (CheckpointError, find_latest, list_checkpoints, load_file,  # noqa: E402
                                 save_checkpoint, validate)

torch.set_num_threads(1)  # before any torch work: deterministic, and nothing threaded to fork
DIM, LAYERS, BATCH = 512, 3, 16


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(DIM, DIM) for _ in range(LAYERS)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def train_step(model, opt, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def digest(model_state: dict, optim_state: dict) -> str:
    """xxh3 of every tensor's bytes (weights, AdamW moments and step counters), in a fixed order."""
    import xxhash
    h = xxhash.xxh3_128()
    tensors = [model_state[k] for k in sorted(model_state)]
    for i in sorted(optim_state["state"]):
        tensors += [optim_state["state"][i][k] for k in sorted(optim_state["state"][i])]
    for t in tensors:
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def writer(root: Path, progress: Path, max_steps: int) -> None:
    """The forked child: resume from the newest checkpoint, then step + save until killed."""
    model, opt = build()
    start = 0
    ckpt = find_latest(root)
    if ckpt is not None:
        model.load_state_dict(load_file(ckpt, "model.pt"))
        opt.load_state_dict(load_file(ckpt, "optim.pt")["optimizer"])
        start = load_file(ckpt, "trainer.pt")["step"]
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for step in range(start, max_steps):
        train_step(model, opt, step)

        def write(d: Path):
            torch.save(model.state_dict(), d / "model.pt")
            torch.save({"optimizer": opt.state_dict()}, d / "optim.pt")
            torch.save({"step": step + 1}, d / "trainer.pt")
        save_checkpoint(root, step + 1, write, keep_last=2)
        os.write(fd, f"{step + 1}\n".encode())


def fork_writer(root: Path, progress: Path, max_steps: int) -> int:
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller
        code = 0
        try:
            writer(root, progress, max_steps)
        except BaseException as e:  # noqa: BLE001 - reported through the exit code
            print(f"writer failed: {type(e).__name__}: {e}", file=sys.stderr)
            code = 3
        finally:
            os._exit(code)
    return pid


class Reference:
    """The uninterrupted run: digests of its state after each step, computed as far as needed."""

    def __init__(self):
        self.model, self.opt = build()
        self.digests = {0: None}

    def at(self, step: int) -> str:
        while max(self.digests) < step:
            s = max(self.digests)
            train_step(self.model, self.opt, s)
            self.digests[s + 1] = digest(self.model.state_dict(), self.opt.state_dict())
        return self.digests[step]


def reported(progress: Path) -> int:
    lines = progress.read_text().split() if progress.is_file() else []
    return int(lines[-1]) if lines else 0


def check(root: Path, ref: Reference, done: int, stats: dict) -> list:
    """Errors of one moment after a kill (see the file docstring); updates the counters in stats."""
    errors = []
    for ck in list_checkpoints(root):
        try:
            validate(ck)
        except CheckpointError:
            stats["rejected"] += 1  # never happens with atomic renames; counted, not an error
            continue
        stats["accepted"] += 1
        try:
            step = load_file(ck, "trainer.pt")["step"]
            got = digest(load_file(ck, "model.pt"), load_file(ck, "optim.pt")["optimizer"])
        except CheckpointError as e:
            errors.append(f"{ck.name} validated but does not load: {e}")
            continue
        if got != ref.at(step):
            errors.append(f"{ck.name} validated but differs from the uninterrupted run at step {step}")
    latest = find_latest(root)
    newest = int(latest.name.split("_")[1]) if latest is not None else 0
    if not done <= newest <= done + 1:
        errors.append(f"find_latest is step {newest}, the last completed save was step {done}")
    return errors


def run_trials(trials: int, root: Path, seed: int = 0, max_delay: float = 0.25) -> dict:
    rng = random.Random(seed)
    ref, progress = Reference(), root / "progress.txt"
    ckpts = root / "checkpoints"
    stats = {"trials": trials, "accepted": 0, "rejected": 0, "killed_mid_save": 0, "steps": 0, "errors": []}
    t0 = time.time()
    for trial in range(trials):
        before = reported(progress)
        pid = fork_writer(ckpts, progress, max_steps=10 ** 6)
        deadline = time.time() + 60
        while reported(progress) == before:  # the writer resumed and completed one save
            if time.time() > deadline or os.waitpid(pid, os.WNOHANG)[0]:
                stats["errors"].append(f"trial {trial}: the writer did not complete a save")
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if list(ckpts.glob(f".*-{pid}")) or list(ckpts.glob(f".latest.tmp{pid}")):
            stats["killed_mid_save"] += 1  # its temporary checkpoint, prune or `latest` file is left over
        stats["errors"] += [f"trial {trial}: {e}" for e in check(ckpts, ref, reported(progress), stats)]
    last = reported(progress)
    final = last + 3  # an uninterrupted writer to the end; its checkpoint must equal the reference
    pid = fork_writer(ckpts, progress, max_steps=final)
    _, status = os.waitpid(pid, 0)
    end = find_latest(ckpts)
    if status != 0 or end is None or end.name != f"step_{final:06d}":
        stats["errors"].append(f"final run: exit status {status}, newest checkpoint {end}")
    else:
        stats["errors"] += [f"final run: {e}" for e in check(ckpts, ref, final, {"accepted": 0, "rejected": 0})]
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith((".tmp-", ".del-", ".old-", ".latest.tmp"))]
    if leftovers:
        stats["errors"].append(f"leftovers of killed writers not cleaned up: {leftovers}")
    stats.update(steps=final, seconds=round(time.time() - t0, 1), corrupt_accepted=sum(
        "validated but" in e for e in stats["errors"]))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kill_stress", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--dir", default=None, help="working directory (default: a fresh temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    args = ap.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kill_stress-"))
    root.mkdir(parents=True, exist_ok=True)
    stats = run_trials(args.trials, root, args.seed)
    print(json.dumps(stats, indent=1))
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
