"""Per-rank profiling (issue 17, item 4): parallel/rank_profile.py splits each instant of a step
into compute / exposed collective / pipeline wait / idle exactly once, and `megaflow profile` under
a multi-process launch reports that for every rank of the config's layout and writes one trace per
rank (real gloo processes, PP=2 with 2 micro-batches)."""
import json

import pytest

from parallel.rank_profile import STEP, breakdown, classify, format_kernels, kernel_groups, sync_sources, work_intervals
from tests.distributed import run_distributed


def test_breakdown_counts_each_instant_once():
    # compute 0-4, an all-reduce 3-6 (1 unit hidden behind compute), a recv 7-9, nothing 6-7 and 9-10
    got = breakdown([(0, 4, "compute"), (3, 6, "collective"), (7, 9, "p2p_wait")], [(0, 10)])
    assert got == {"compute": 4.0, "collective": 2.0, "p2p_wait": 2.0, "idle": 2.0, "collective_total": 3.0}
    # only what lies inside the steps counts; a step with no event at all is idle
    got = breakdown([(0, 4, "compute")], [(2, 3), (20, 25)])
    assert got["compute"] == 1.0 and got["idle"] == 5.0


def test_device_work_leaves_out_profiler_ranges():
    """On CUDA the step's own range is also recorded on the device (a user annotation spanning the
    whole step): counted as a kernel, it made every instant 'compute' (seen on 2 H200s)."""
    from types import SimpleNamespace as E
    from torch.autograd import DeviceType
    span = lambda a, b: E(start=a, end=b)  # noqa: E731
    events = [E(name=STEP, device_type=DeviceType.CPU, is_user_annotation=True, time_range=span(0, 10)),
              E(name=STEP, device_type=DeviceType.CUDA, is_user_annotation=True, time_range=span(0, 10)),
              E(name="## forward ##", device_type=DeviceType.CUDA, is_user_annotation=True, time_range=span(0, 9)),
              E(name="sm90_gemm", device_type=DeviceType.CUDA, is_user_annotation=False, time_range=span(0, 4)),
              E(name="ncclDevKernel_AllReduce_Sum_f32", device_type=DeviceType.CUDA, is_user_annotation=False,
                time_range=span(3, 6))]
    got = breakdown(work_intervals(events, cuda=True), [(0, 10)])
    assert got == {"compute": 4.0, "collective": 2.0, "p2p_wait": 0.0, "idle": 4.0, "collective_total": 3.0}


def test_kernel_groups_split_the_device_time_by_kind():
    """Where a step's device time goes (issue 17: 8 micro-batches cost 12% more than one on one GPU): cuBLAS
    GEMMs, FlexAttention's inductor templates, the foreach gradient flushes, our own Triton kernels, inductor's
    fused kernels, per step; the profiler's own ranges left out."""
    from types import SimpleNamespace as E
    from torch.autograd import DeviceType
    kernel = lambda name, us: E(name=name, device_type=DeviceType.CUDA, is_user_annotation=False,  # noqa: E731
                                time_range=E(start=0, end=us))
    events = [kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 3000), kernel("sm90_xmma_gemm_bf16", 1000),
              kernel("triton_tem_fused_flex_attention_backward_1", 2000),
              kernel("void at::native::multi_tensor_apply_kernel<BinaryOpListAlphaFunctor<float>>", 500),
              kernel("swiglu_backward_kernel", 400), kernel("triton_per_fused_add_mul_0", 100),
              kernel("adamw_kernel", 200), kernel("ncclDevKernel_SendRecv", 50), kernel("mystery", 10),
              E(name=STEP, device_type=DeviceType.CUDA, is_user_annotation=True, time_range=E(start=0, end=9000)),
              E(name="aten::mm", device_type=DeviceType.CPU, time_range=E(start=0, end=5000))]
    got = kernel_groups(events, steps=2)
    assert got == {"gemm": (2.0, 1.0), "attention": (1.0, 0.5), "foreach (grad flush / zero / norm)": (0.25, 0.5),
                   "our triton (swiglu / add_norm / rope)": (0.2, 0.5), "flat adamw": (0.1, 0.5),
                   "inductor fused": (0.05, 0.5), "nccl": (0.025, 0.5), "other": (0.005, 0.5)}, got
    assert list(got)[:2] == ["gemm", "attention"]  # costliest first
    assert format_kernels(got).startswith("device kernels per step: 3.6 ms in all; gemm 2.0 ms (1), attention 1.0 ms")


def test_sync_sources_name_the_operator_and_the_copy_direction():
    """Where a step's host waits and copies come from: each synchronising call or copy with its
    calling operators and host time per step, and the device's copies by direction (on 2 H200s the
    '30 blocking copies' of a TP=2 step were device-to-device copies under argsort and the
    functional all-reduce, which do not block the host)."""
    from types import SimpleNamespace as E
    from torch.autograd import DeviceType
    span = lambda a, b: E(start=a, end=b)  # noqa: E731
    step = E(name=STEP, cpu_parent=None)
    clone = E(name="aten::clone", cpu_parent=E(name="_c10d_functional::all_reduce", cpu_parent=step))
    copy = E(name="aten::copy_", cpu_parent=clone)
    events = [E(name="cudaMemcpyAsync", device_type=DeviceType.CPU, cpu_parent=copy, time_range=span(0, 300)),
              E(name="cudaMemcpyAsync", device_type=DeviceType.CPU, cpu_parent=copy, time_range=span(400, 500)),
              E(name="Memcpy DtoD (Device -> Device)", device_type=DeviceType.CUDA, time_range=span(0, 5)),
              E(name="Memcpy DtoD (Device -> Device)", device_type=DeviceType.CUDA, time_range=span(9, 12)),
              E(name="aten::mm", device_type=DeviceType.CPU, cpu_parent=step, time_range=span(0, 900))]
    lines = sync_sources(events, steps=2).splitlines()
    assert lines[0].split() == ["1.0", "x", "0.20", "ms", "host", "cudaMemcpyAsync", "<-", "aten::copy_", "<-",
                                "aten::clone", "<-", "_c10d_functional::all_reduce"], lines
    assert lines[1].split() == ["1.0", "x", "device", "Memcpy", "DtoD", "(Device", "->", "Device)"], lines
    assert len(lines) == 2, lines


@pytest.mark.parametrize("name, kind", [("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
                                        ("ncclDevKernel_SendRecv", "p2p_wait"),
                                        ("ncclKernel_AllGather_RING_LL_Sum_bfloat16", "collective"),
                                        ("sm90_xmma_gemm_bf16bf16_bf16f32", "compute"),
                                        ("gloo:all_reduce", "collective"), ("aten::mm", "compute")])
def test_classify(name, kind):
    assert classify(name) == kind


def _profile_cli(rank, world, out):
    from tools.profile_step import main
    assert main(["--tiny", "--device", "cpu", "--set", "parallel.pp=2", "--set", "parallel.micro_batches=2",
                 "--steps", "1", "--warmup", "1", "--profile", "1", "--trace", f"{out}/traces",
                 "--json", f"{out}/ranks.json"]) == 0


def test_megaflow_profile_under_torchrun_reports_every_rank(tmp_path):
    run_distributed(_profile_cli, 2, str(tmp_path))
    rows = json.loads((tmp_path / "ranks.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["config"] and len(rows[0]["ranks"]) == 2
    for r in rows[0]["ranks"]:
        p = r["profile"]
        parts = p["compute"] + p["collective"] + p["p2p_wait"] + p["idle"]
        assert abs(parts - p["step"]) <= 1e-6 + 1e-3 * p["step"], p  # every instant counted once
        assert p["compute"] > 0 and p["step"] > 0, p
    assert sorted(f.name for f in (tmp_path / "traces").iterdir()) == ["config.rank0.json", "config.rank1.json"]
