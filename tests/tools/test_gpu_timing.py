"""tools/gpu_timing.py: a phase's clock summary counts only the samples inside its host-time window
(median SM clock and power, the share of samples under each clock limit); off CUDA both helpers are
inert and say why."""
import torch

from tools.gpu_timing import ClockSampler, StepEvents


def test_phase_summary_and_cpu_inertness():
    events = StepEvents(torch.device("cpu"))
    events.start()
    events.end()
    assert events.per_step_ms(True) == [] and events.per_step_ms(False) == []
    s = ClockSampler(torch.device("cpu"))
    assert s.error == "not a CUDA device" and s.summary(0, 1) == {"samples": 0, "error": "not a CUDA device"}
    #               (time, SM MHz, W, reasons: 0x4 power cap)
    s.samples = [(0.5, 1980, 300.0, 0), (1.0, 1980, 690.0, 0), (1.5, 1755, 700.0, 0x4), (2.0, 1740, 702.0, 0x4),
                 (3.5, 1980, 120.0, 0)]
    assert s.summary(0.9, 2.1) == {"samples": 3, "sm_mhz": 1755, "power_w": 700, "limits": {"power cap": 0.67}}
    assert s.summary(0.0, 1.2)["limits"] == {}
