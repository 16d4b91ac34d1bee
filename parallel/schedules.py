"""Pipeline schedules as plain per-rank action lists, and a simulator that checks and times them.

A schedule is, for every pipeline rank, an ordered list of `Action(kind, chunk, micro_batch)`:
'F' runs one micro-batch forward through one of the rank's model chunks, 'B' runs its backward.
Virtual stage `s = chunk * pp + rank` (Megatron's interleaved placement: rank r holds chunks
r, r + pp, r + 2pp, ... of the model); with `virtual_stages == 1` that is plain 1F1B.

Nothing here touches torch or ranks: the executor (parallel/pipeline_step.py) walks the list with
blocking receives and asynchronous sends, and this file proves, by simulation, that every list it
hands out finishes (no receive waits on a send that comes later) and that, on every directed link,
messages are received in the order they are sent (NCCL matches point-to-point messages by order,
not by tag). The same simulator gives the theoretical bubble that tools/bench_pp.py compares with.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str  # 'F' (forward) or 'B' (backward)
    chunk: int  # model chunk on this rank (0 .. virtual_stages-1)
    micro_batch: int


def check_schedule(schedule: str, pp: int, virtual_stages: int, micro_batches: int) -> None:
    """Raise a ValueError a user can act on for a schedule that cannot run."""
    if schedule not in ("1f1b", "interleaved"):
        raise ValueError(f"parallel.schedule={schedule!r} must be '1f1b' or 'interleaved'")
    if micro_batches < 1:
        raise ValueError(f"parallel.micro_batches={micro_batches} must be >= 1")
    if schedule == "1f1b" and virtual_stages != 1:
        raise ValueError(f"parallel.virtual_stages={virtual_stages} needs parallel.schedule='interleaved' "
                         f"(1F1B runs one model chunk per rank); set virtual_stages=1 or schedule='interleaved'")
    if schedule == "interleaved":
        if pp < 2:
            raise ValueError(f"parallel.schedule='interleaved' needs parallel.pp >= 2, got pp={pp}")
        if virtual_stages < 2:
            raise ValueError(f"parallel.schedule='interleaved' needs parallel.virtual_stages >= 2, got {virtual_stages}")
        if micro_batches % pp:
            raise ValueError(f"interleaved schedule: parallel.micro_batches={micro_batches} must be a multiple of "
                             f"parallel.pp={pp} (micro-batches go through the chunks in groups of pp)")


def _interleaved_index(k: int, pp: int, v: int, backward: bool):
    """k-th forward (or backward) of a rank -> (chunk, micro_batch), Megatron's order: groups of pp
    micro-batches go through chunk 0, then chunk 1, ...; backwards walk the chunks in reverse."""
    chunk = (k // pp) % v
    mb = (k // (pp * v)) * pp + k % pp
    return (v - 1 - chunk if backward else chunk), mb


def rank_actions(schedule: str, pp: int, rank: int, micro_batches: int, virtual_stages: int = 1) -> list:
    """This pipeline rank's actions for one step: warm-up forwards, then one-forward-one-backward,
    then the remaining backwards."""
    check_schedule(schedule, pp, virtual_stages, micro_batches)
    m, v = micro_batches, virtual_stages
    total = m * v
    if schedule == "1f1b":
        warmup = min(pp - rank - 1, m)
        fwd = [(0, i) for i in range(m)]
        bwd = [(0, i) for i in range(m)]
    else:
        warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
        fwd = [_interleaved_index(k, pp, v, False) for k in range(total)]
        bwd = [_interleaved_index(k, pp, v, True) for k in range(total)]
    acts = [Action("F", *fwd[k]) for k in range(warmup)]
    for i in range(total - warmup):
        acts += [Action("F", *fwd[warmup + i]), Action("B", *bwd[i])]
    acts += [Action("B", *bwd[k]) for k in range(total - warmup, total)]
    return acts


def simulate(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1,
             f: float = 1.0, b: float = 2.0, comm: float = 0.0) -> dict:
    """Run the schedule on an idealised machine: a forward of one chunk takes f / virtual_stages, a
    backward b / virtual_stages, a message `comm`; or give f and b as per-virtual-stage lists of
    durations (e.g. measured) to include stage imbalance. Returns makespan, busy time per rank, the bubble
    fraction 1 - busy / (pp * makespan), and the start/end time of every action. Raises RuntimeError
    if the schedule deadlocks."""
    v, m = virtual_stages, micro_batches
    S = pp * v
    acts = [rank_actions(schedule, pp, r, m, v) for r in range(pp)]
    done = {}  # (kind, stage, mb) -> end time
    pos, free, busy = [0] * pp, [0.0] * pp, [0.0] * pp
    timeline = [[] for _ in range(pp)]
    remaining = sum(len(a) for a in acts)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(acts[r]):
                a = acts[r][pos[r]]
                s = a.chunk * pp + r
                if a.kind == "F":
                    dep = ("F", s - 1, a.micro_batch) if s > 0 else None
                    dur = f[s] if isinstance(f, (list, tuple)) else f / v
                else:
                    dep = ("B", s + 1, a.micro_batch) if s < S - 1 else ("F", s, a.micro_batch)
                    dur = b[s] if isinstance(b, (list, tuple)) else b / v
                if dep is not None and dep not in done:
                    break
                ready = done[dep] + (comm if dep[1] != s else 0.0) if dep is not None else 0.0
                start = max(free[r], ready)
                free[r] = start + dur
                busy[r] += dur
                done[(a.kind, s, a.micro_batch)] = free[r]
                timeline[r].append((a, start, free[r]))
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: acts[r][pos[r]] for r in range(pp) if pos[r] < len(acts[r])}
            raise RuntimeError(f"{schedule} schedule deadlocks (pp={pp}, v={v}, m={m}); waiting: {stuck}")
    makespan = max(free)
    return {"makespan": makespan, "busy": busy, "bubble": 1.0 - sum(busy) / (pp * makespan), "timeline": timeline}


def theory_bubble(pp: int, micro_batches: int, virtual_stages: int = 1) -> float:
    """Bubble fraction of 1F1B, (p-1) / (m+p-1); interleaving divides the bubble time by v:
    (p-1)/v / (m + (p-1)/v), as in Megatron's paper (Narayanan et al. 2021)."""
    idle = (pp - 1) / virtual_stages
    return idle / (micro_batches + idle)


def link_orders(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1) -> dict:
    """For every directed link (kind, src_rank, dst_rank): the messages in the order the sender
    sends them and in the order the receiver receives them, each as (src_stage, micro_batch)."""
    v, S = virtual_stages, pp * virtual_stages
    orders = {}
    for r in range(pp):
        for a in rank_actions(schedule, pp, r, micro_batches, v):
            s = a.chunk * pp + r
            if a.kind == "F":
                sends, recvs = (s + 1 < S, s + 1), (s > 0, s - 1)
                kind = "act"
            else:
                sends, recvs = (s > 0, s - 1), (s + 1 < S, s + 1)
                kind = "grad"
            if sends[0]:
                key = (kind, r, sends[1] % pp)
                orders.setdefault(key, ([], []))[0].append((s, a.micro_batch))
            if recvs[0]:
                key = (kind, recvs[1] % pp, r)
                orders.setdefault(key, ([], []))[1].append((recvs[1], a.micro_batch))
    return orders


def check_link_order(schedule: str, pp: int, micro_batches: int, virtual_stages: int = 1) -> None:
    """Raise if, on some directed link, messages would be received out of send order."""
    for key, (sent, received) in link_orders(schedule, pp, micro_batches, virtual_stages).items():
        if sent != received:
            raise RuntimeError(f"{schedule}: link {key} sends {sent} but receives {received}")
