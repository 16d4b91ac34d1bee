"""Several benchmark processes on the same GPUs, side by side, timed one at a time
(`tools/bench_scaling.py --turns DIR`).

A cold torch.compile of a 0.9B row takes about a minute of host time, and a GPU lease is short; rows
that compile one after the other spend most of it compiling. With --turns, several bench processes
(one row each, each its own torchrun and port) start together: each runs its row's first step (the
compile) at once, then says it is ready and waits, its GPU idle, until every process is ready (or
`wait_s` has passed since it started: a process that died does not hold the others), and then they take
turns (with `order`, in that order: process k waits for processes 0..k-1, each at most `slot_s` past the
deadline, so a slow or dead one is skipped): one
process at a time holds DIR/lock for the rest of its row (the other warm-up steps, the CUDA graph
capture, the timed steps, the profile); a process's later rows hold it for the whole row. Nothing of another process runs on the GPUs during a turn:
the waiting ones are synchronised and idle, and kernels of different processes would otherwise
time-slice the GPU.

Only the host coordinates: rank 0 takes an fcntl lock on DIR/lock and writes "ID:TURN" to DIR/owner;
the other ranks poll that file (no NCCL kernel spins while they wait). Not here: the rows themselves.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


class Turns:
    """`start()` after a row's first step, `end()` after its last work; both do nothing when `path` is ''."""

    def __init__(self, path: str, n: int, wait_s: float, order: int = -1, slot_s: float = 20.0):
        self.dir, self.n, self.deadline = Path(path) if path else None, n, time.time() + wait_s
        self.order, self.slot_s = order, slot_s  # order >= 0: the first turn after those of processes 0..order-1
        self.id = os.environ.get("MASTER_PORT", str(os.getpid()))  # one per torchrun
        self.turn, self.lock = 0, None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _sync(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # what a waiting process does not use, the turn's holder may

    def ready(self) -> None:
        """Count this process as ready (its row compiled)."""
        if self.dir is not None and dist.get_rank() == 0:
            (self.dir / f"ready.{self.id}").touch()

    def give_up(self) -> None:
        """A row failed: count this process as ready and done, and free the GPUs if it held them."""
        if self.dir is None or dist.get_rank() != 0:
            return
        self.ready()
        self._release()

    def _release(self) -> None:
        """Rank 0: this process's turn is over (counted done in the order) and the GPUs are free."""
        if self.order >= 0:
            (self.dir / f"done.{self.order}").touch()
        if self.lock is not None:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None

    def start(self) -> None:
        if self.dir is None:
            return
        self._sync()
        owner, me = self.dir / "owner", f"{self.id}:{self.turn}"
        if dist.get_rank() == 0:
            self.ready()
            while len(list(self.dir.glob("ready.*"))) < self.n and time.time() < self.deadline:
                time.sleep(0.1)
            for j in range(self.order if self.turn == 0 else 0):  # each earlier one done, or late by its slot
                while not (self.dir / f"done.{j}").exists() and time.time() < self.deadline + self.slot_s * (j + 1):
                    time.sleep(0.05)
            self.lock = open(self.dir / "lock", "a+")
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            owner.write_text(me)
        else:
            while not owner.exists() or owner.read_text() != me:
                time.sleep(0.02)

    def end(self) -> None:
        if self.dir is None:
            return
        self._sync()
        dist.barrier()  # every rank of this process is done with the GPUs
        if self.lock is not None:
            (self.dir / "owner").write_text("")
            self._release()
        self.turn += 1
