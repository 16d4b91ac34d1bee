"""Per-rank time breakdown of training steps (issue 17, item 4): compute, exposed communication,
pipeline waits and idle time on every rank of a multi-process run, from a torch.profiler trace,
and optionally one Chrome trace per rank.

How time is split (`breakdown`). Each instant of the profiled steps counts once, in this order:
  compute     some compute kernel runs (any kernel that is not a collective or a send/recv)
  collective  an all-reduce / all-gather / reduce-scatter / broadcast runs and no compute does:
              communication NOT hidden behind compute (the part overlap should remove)
  p2p_wait    only a pipeline send/recv runs: on the receiving side a recv kernel runs from its
              launch until the peer's data arrives, so this is the pipeline bubble plus transfers
  idle        nothing runs: the host is behind (launch overhead, Python, a blocking read-back)
plus `collective_total`, all collective time whether hidden or not (hidden = total - exposed).
On CUDA the device's kernels are classified by name; on CPU (gloo) the host's top-level operators,
which measures the same thing for a process whose compute runs on the host. Limit: NCCL >= 2.19
launches grouped operations (batch_isend_irecv) as `ncclDevKernel_Generic` kernels, which count as
collectives, so under PP on NCCL pipeline waits show in the collective columns.

Not here: what a step does (the engines), the single-process profile (tools/profile_step.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

KINDS = ("compute", "collective", "p2p_wait", "idle")
_P2P = ("sendrecv", "send_recv", "send", "recv")
_COMM = ("nccl", "gloo", "c10d", "allreduce", "all_reduce", "allgather", "all_gather", "reduce_scatter",
         "reducescatter", "broadcast", "barrier")


def classify(name: str) -> str:
    """'collective', 'p2p_wait' or 'compute' for a kernel or operator name."""
    n = name.lower()
    if any(k in n for k in _COMM) or n.startswith(("c10d::", "record_param_comms")):
        return "p2p_wait" if any(k in n for k in _P2P) else "collective"
    if n.startswith(("aten::isend", "aten::irecv")) or n in ("recv", "send"):
        return "p2p_wait"
    return "compute"


def breakdown(intervals: list, windows: list) -> dict:
    """Time of each kind inside `windows` [(start, end)] (the steps), from `intervals`
    [(start, end, kind)], in the intervals' unit; plus 'collective_total'."""
    points = sorted([(s, 1, k) for s, e, k in intervals if e > s] + [(e, -1, k) for s, e, k in intervals if e > s],
                    key=lambda p: (p[0], p[1]))
    out = dict.fromkeys(KINDS + ("collective_total",), 0.0)
    active = {"compute": 0, "collective": 0, "p2p_wait": 0}
    prev = float("-inf")
    for t, delta, kind in points + [(float("inf"), 0, "compute")]:
        if t > prev:  # [prev, t): what was active, clipped to the steps
            inside = sum(max(0.0, min(t, w1) - max(prev, w0)) for w0, w1 in windows)
            if inside:
                out[next((k for k in ("compute", "collective", "p2p_wait") if active[k]), "idle")] += inside
                if active["collective"]:
                    out["collective_total"] += inside
        active[kind] += delta
        prev = t
    return out


STEP = "megaflow_step"  # the profiler range around each step
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
          "cudaMemcpyAsync")  # a copy to or from pageable host memory blocks the host too


def work_intervals(events, cuda: bool) -> list:
    """(start, end, kind) of the work in a profile's events: on CUDA the device's kernels and copies,
    never the device-side copies of profiler ranges (`is_user_annotation`: the step's range would
    cover the whole step and count it all as compute); on CPU the operators directly inside a step."""
    from torch.autograd import DeviceType
    if cuda:
        work = [e for e in events if e.device_type == DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False) and e.name != STEP]
    else:
        work = [e for e in events if e.cpu_parent is not None and e.cpu_parent.name == STEP]
    return [(e.time_range.start, e.time_range.end, classify(e.name)) for e in work]


# device kernels by what they do (`kernel_groups`): the first group whose pattern is in the kernel's name
# (lower case). Inductor's templates (triton_tem_*) are FlexAttention's under the default compile mode, where
# GEMMs are cuBLAS's (nvjet_*, *gemm*); our own Triton kernels by their function names
KERNEL_GROUPS = (("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
                 ("attention", ("triton_tem", "flex", "attention", "fmha", "flash")),
                 ("nccl", ("nccl",)),
                 ("flat adamw", ("adamw",)),
                 ("foreach (grad flush / zero / norm)", ("multi_tensor_apply", "foreach")),
                 ("our triton (swiglu / add_norm / rope)", ("swiglu", "backward_kernel", "forward_kernel")),
                 ("inductor fused", ("triton_",)),
                 ("reductions", ("reduce",)),
                 ("copies / fills", ("copy", "memcpy", "memset", "fill", "cat")),
                 ("other elementwise", ("elementwise",)))


def kernel_groups(events, steps: int) -> dict:
    """{group: (device ms per step, kernels per step)} of the CUDA kernels in a profile's events, grouped by
    `KERNEL_GROUPS` ('other' for the rest): where a step's device time goes, e.g. one micro-batch against 8."""
    from torch.autograd import DeviceType
    out = {}
    for e in events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False) or e.name == STEP:
            continue
        n = e.name.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in n for k in keys)), "other")
        ms, count = out.get(group, (0.0, 0))
        out[group] = (ms + (e.time_range.end - e.time_range.start) / 1e3, count + 1)
    return {g: (ms / steps, c / steps) for g, (ms, c) in sorted(out.items(), key=lambda kv: -kv[1][0])}


def format_kernels(groups: dict) -> str:
    """One line: each group's device ms per step and kernel count, and their total."""
    total = sum(ms for ms, _ in groups.values())
    return f"device kernels per step: {total:.1f} ms in all; " + ", ".join(
        f"{g} {ms:.1f} ms ({c:.0f})" for g, (ms, c) in groups.items())


def profile_steps(step: Callable[[], None], steps: int, device: torch.device,
                  trace: Optional[str] = None, top: int = 0) -> dict:
    """Run `step` `steps` times under torch.profiler; returns this rank's per-step seconds of each
    kind (`breakdown`) and 'step'; writes a Chrome trace to `trace` if given. `top` > 0: also 'top',
    tables of the operators and kernels that took the most device time, then host time (on CPU host
    time only), 'syncs', how many times per step the host may have waited for the device
    (synchronize calls and copies between host and device: on pageable memory those block too;
    device-to-device copies left out), and 'sync_sources' (`sync_sources`). On CUDA also 'kernels', the device
    time by kind of kernel (`kernel_groups`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
                if cuda:
                    torch.cuda.synchronize(device)
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)
    events = prof.events()
    windows = [(e.time_range.start, e.time_range.end) for e in events
               if e.name == STEP and e.device_type == DeviceType.CPU]
    out = breakdown(work_intervals(events, cuda), windows)
    n = max(len(windows), 1)
    res = {k: v / 1e6 / n for k, v in out.items()}  # microseconds -> seconds per step
    res["step"] = sum(w1 - w0 for w0, w1 in windows) / 1e6 / n
    if cuda:
        res["kernels"] = kernel_groups(events, n)
    if top:  # on CUDA what the device spent its time on, then what the host did
        ops = prof.key_averages()
        keys = ("self_device_time_total", "self_cpu_time_total") if cuda else ("self_cpu_time_total",)
        res["top"] = "\n".join(ops.table(sort_by=k, row_limit=top, max_name_column_width=60) for k in keys)
        # a device-to-device copy goes through cudaMemcpyAsync too but does not block the host: not counted
        d2d = sum(e.device_type == DeviceType.CUDA and "DtoD" in e.name for e in events)
        res["syncs"] = (sum(e.name in _SYNCS for e in events) - d2d) / n - cuda  # less our own synchronize per step
        res["sync_sources"] = sync_sources(events, n)
    return res


def sync_sources(events, steps: int, depth: int = 4) -> str:
    """Where the host waited or copied, per step: each synchronising runtime call or host<->device
    copy with its chain of calling operators (`cudaMemcpyAsync <- aten::copy_ <- aten::_to_copy <-
    aten::to`) and its host time, and the device's copies by direction (a device-to-device copy
    does not block the host; one to or from pageable host memory does)."""
    from collections import defaultdict
    from torch.autograd import DeviceType
    calls = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in _SYNCS:
            chain, parent = [e.name], e.cpu_parent
            while parent is not None and len(chain) < depth and parent.name != STEP:
                chain.append(parent.name)
                parent = parent.cpu_parent
            calls[" <- ".join(chain)][0] += 1
            calls[" <- ".join(chain)][1] += e.time_range.end - e.time_range.start
    copies = defaultdict(int)
    for e in events:
        if e.device_type == DeviceType.CUDA and e.name.lower().startswith("memcpy"):
            copies[e.name] += 1
    lines = [f"{n / steps:6.1f} x {us / steps / 1e3:8.2f} ms host  {chain}"
             for chain, (n, us) in sorted(calls.items(), key=lambda kv: -kv[1][1])]
    lines += [f"{n / steps:6.1f} x device {name}" for name, n in sorted(copies.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def sync_points(step: Callable[[], None], device: torch.device, frames: int = 4) -> str:
    """Run `step` once under torch.cuda.set_sync_debug_mode('warn') and list the Python call sites
    (our files' innermost `frames` frames) where the host synchronised with the GPU, with counts.
    '' off CUDA."""
    import traceback
    import warnings
    from collections import Counter
    if device.type != "cuda":
        return ""
    sites = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            ours = [f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                    for f in traceback.extract_stack()[:-1] if "site-packages" not in f.filename
                    and "/lib/python" not in f.filename]
            sites[" <- ".join(reversed(ours[-frames:]))] += 1
    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.current_stream(device).synchronize()  # not a counted operator: a stream call
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    return "\n".join(f"{n:4d} x {site}" for site, n in sites.most_common())


def gather_ranks(row: dict, group=None) -> list:
    """Every rank's `row`, in rank order, on every rank (one object collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [row]
    rows = [None] * dist.get_world_size(group)
    dist.all_gather_object(rows, row, group=group)
    return rows


def format_ranks(rows: list) -> str:
    """A Markdown table: one line per rank, milliseconds per step and shares of the step."""
    head = "| rank | step ms | compute | exposed collective | p2p wait (bubble) | idle | collective total (hidden) |\n"
    head += "|---|---|---|---|---|---|---|\n"
    lines = []
    for r, x in enumerate(rows):
        s = max(x["step"], 1e-12)
        hidden = x["collective_total"] - x["collective"]
        lines.append(f"| {r} | {x['step'] * 1e3:.1f} | " + " | ".join(
            f"{x[k] * 1e3:.1f} ({x[k] / s:.0%})" for k in KINDS) + f" | {x['collective_total'] * 1e3:.1f} "
            f"({hidden * 1e3:.1f}) |")
    return head + "\n".join(lines)


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
