"""Save on signal: SIGUSR1 and SIGTERM (what SLURM sends before a time limit, at preemption and at
`scontrol requeue`) only set a flag here; the training loop asks all ranks at the next step boundary
(parallel.runtime.any_rank), saves a checkpoint and ends the run cleanly, so the requeued job resumes
where it stopped (Megatron's pattern). The handler does no I/O and no collective: a signal may land
inside one.

A run that is signalled again before it makes a single step (a `--time` too short for the signal's
lead, say) makes no progress; after `MAX_IDLE_STOPS` such stops in a row the run fails with an error
instead of being requeued forever. The count lives in OUT_DIR/stops.json.

Not here: the requeue itself (launchers/slurm_train.sh) and the agreement collective (parallel/runtime.py).
"""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Optional

log = logging.getLogger("megaflow")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
MAX_IDLE_STOPS = 2  # signalled stops in a row without a step, then an error


class StopSignals:
    """Catches STOP_SIGNALS while installed (main thread only); `received` is the first one's name."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def note_stop(out: Path, step: int, progressed: bool, why: str) -> int:
    """Record a signalled stop at `step` in OUT_DIR/stops.json; returns how many stops in a row made
    no progress (0 when this one did)."""
    path = out / "stops.json"
    try:
        idle = json.loads(path.read_text()).get("idle_stops", 0) if path.is_file() else 0
    except (ValueError, OSError):
        idle = 0
    idle = 0 if progressed else idle + 1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, "signal": why, "idle_stops": idle}))
    tmp.replace(path)
    return idle


def idle_error(why: str, step: int, idle: int, out: Path) -> str:
    return (f"{why} stopped the run {idle} times in a row before it made a single step (it stays at step {step}): "
            f"a requeue would loop forever. Give the job a longer --time (the signal comes --signal=B:USR1@N "
            f"seconds before it; leave several minutes after start-up) or a smaller @N, then resubmit; the run "
            f"resumes from {str(out / 'checkpoints')!r} (delete {str(out / 'stops.json')!r} to reset this count)")
