"""What the GPU itself did during profiled steps (tools/profile_step.py): per-step GPU time from CUDA
events, and the SM clock, power draw and clock-limit reasons sampled by NVML while the steps ran.

Why: a step timed on the host, synced, and the same steps back to back can differ for reasons the
host clock cannot tell apart: the GPU waiting for the host (gaps between kernels), or the GPU running
slower (a lower SM clock under the power cap when it never rests between steps). Event times give
the GPU's own per-step time in both timings; the samples give the clock each phase ran at.

`StepEvents` records a start and an end event around each step (nothing waits); `per_step_ms()`
reads them after the caller's final sync: end - start of each step (synced steps), or start to the
next step's start (back to back, where the GPU runs the steps without a pause). `ClockSampler`
polls NVML (nvidia-ml-py) in a thread every `period_s` and summarises the samples of a phase (a host
time window). Both are inert off CUDA or without NVML (`ClockSampler.error` says why).
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

# NVML clock-event reasons (nvmlClocksEventReason*): the ones a training step can hit
REASONS = {0x4: "power cap", 0x8: "HW slowdown", 0x20: "SW thermal", 0x40: "HW thermal", 0x80: "power brake"}


class StepEvents:
    def __init__(self, device: torch.device):
        self.on = device.type == "cuda"
        self.pairs = []

    def start(self) -> None:
        if self.on:
            self.pairs.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.pairs[-1][0].record()

    def end(self) -> None:
        if self.on:
            self.pairs[-1][1].record()

    def gaps_ms(self) -> list:
        """After a sync, before per_step_ms: the GPU ms between each step's end and the next step's start
        (back to back: where the GPU waited for the host to launch the next step)."""
        return [a[1].elapsed_time(b[0]) for a, b in zip(self.pairs, self.pairs[1:])] if self.on else []

    def per_step_ms(self, back_to_back: bool) -> list:
        """After a sync: each step's GPU ms (see the module docstring); the events are then dropped."""
        p, self.pairs = self.pairs, []
        if back_to_back:
            return [a[0].elapsed_time(b[0]) for a, b in zip(p, p[1:])] + [p[-1][0].elapsed_time(p[-1][1])] if p else []
        return [a.elapsed_time(b) for a, b in p]


class ClockSampler:
    def __init__(self, device: torch.device, period_s: float = 0.02):
        self.samples, self.error, self._stop = [], None, threading.Event()
        self.handle, self.period_s, self.nvml = None, period_s, None
        if device.type != "cuda":
            self.error = "not a CUDA device"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            try:  # by UUID: CUDA_VISIBLE_DEVICES renumbers devices, NVML does not
                uuid = str(torch.cuda.get_device_properties(device).uuid)
                self.handle = pynvml.nvmlDeviceGetHandleByUUID((uuid if uuid.startswith("GPU-") else "GPU-" + uuid).encode())
            except Exception:  # noqa: BLE001 - torch's own mapping of the index
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
            self.nvml = pynvml
            self.reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                pynvml.nvmlDeviceGetCurrentClocksThrottleReasons  # the older name
        except Exception as e:  # noqa: BLE001 - no NVML: the profile still runs, without clocks
            self.error = f"{type(e).__name__}: {str(e)[:120]}"
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n, h = self.nvml, self.handle
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                                     n.nvmlDeviceGetPowerUsage(h) / 1000, self.reasons(h)))
            except Exception as e:  # noqa: BLE001 - a query this driver lacks: stop sampling, say why
                self.error = f"{type(e).__name__}: {str(e)[:120]}"
                return
            time.sleep(self.period_s)

    def stop(self) -> None:
        self._stop.set()

    def summary(self, t0: float, t1: float) -> dict:
        """Median SM MHz, median W, and the share of samples under each clock limit in [t0, t1]."""
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if not s:
            return {"samples": 0, **({"error": self.error} if self.error else {})}
        limits = {name: round(sum(bool(x[3] & bit) for x in s) / len(s), 2) for bit, name in REASONS.items()}
        return {"samples": len(s), "sm_mhz": statistics.median(x[1] for x in s),
                "power_w": round(statistics.median(x[2] for x in s)), "limits": {k: v for k, v in limits.items() if v}}
