"""What one tensor-parallel collective of the h200_1b step costs on 2 GPUs, by route (issue 17):
NCCL (torch's functional collectives, as the compiled step runs them) against torch's symmetric-memory
ops, which copy through NVLink peer pointers instead of NCCL kernels (one-shot / two-shot all-reduce,
and the fused all-gather-matmul / matmul-reduce-scatter that inductor's micro-pipeline TP emits).
Shape: one activation of configs/h200_1b.yaml at 8 x 1024 tokens, (8, 1024, 2048) bf16 = 32 MiB.

    torchrun --nproc_per_node 2 tools/device/tp_comm_probe.py

Prints ms per call (median of 20 after 3) on rank 0; a route this torch lacks prints why and is skipped.
Not a test: nothing here checks numbers beyond the fused ops' agreement with the plain ones.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.bench_attention import timed as _timed  # noqa: E402  (median ms of CUDA events)

timed = partial(_timed, iters=20, warmup=3)


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    group = dist.group.WORLD
    name, n = group.group_name, dist.get_world_size()
    B, T, D, N = 8, 1024, 2048, 2048  # rows, tokens, width, a column layer's local outputs (qkv: 4096 / 2)
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)  # (B, T, D)
    shard = x.chunk(n, 1)[0].contiguous()  # (B, T / n, D)
    w = torch.randn(N, D, device="cuda", dtype=torch.bfloat16) * 0.02  # (N, D)
    rows = {}

    def wait(t):
        return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t

    rows["nccl all_reduce (B, T, D)"] = timed(lambda: wait(funcol.all_reduce(x, "sum", group)))
    rows["nccl all_gather dim 0 (B, T/n, D) -> (nB, T/n, D)"] = timed(lambda: wait(funcol.all_gather_tensor(shard, 0, group)))
    rows["nccl reduce_scatter dim 0 (B, T, D) -> (B/n, T, D)"] = timed(lambda: wait(funcol.reduce_scatter_tensor(x, "sum", 0, group)))
    rows["mm (nB, T/n, D) x (D, N)"] = timed(lambda: x.flatten(0, 1) @ w.t())
    rows["nccl all_gather + mm"] = timed(lambda: wait(funcol.all_gather_tensor(shard, 0, group)).flatten(0, 1) @ w.t())
    try:
        import torch.distributed._symmetric_memory as symm_mem
        try:
            symm_mem.enable_symm_mem_for_group(name)
        except Exception:  # noqa: BLE001  (a no-op need in newer torch)
            pass
        buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, name)
        buf.copy_(x)
        ops = torch.ops.symm_mem
        if hasattr(ops, "one_shot_all_reduce"):
            rows["symm one_shot_all_reduce (from a symmetric buffer)"] = timed(lambda: ops.one_shot_all_reduce(buf, "sum", name))
            rows["copy in + symm one_shot_all_reduce"] = timed(lambda: ops.one_shot_all_reduce(buf.copy_(x), "sum", name))
        if hasattr(ops, "two_shot_all_reduce_"):
            rows["copy in + symm two_shot_all_reduce_ (in place)"] = timed(lambda: ops.two_shot_all_reduce_(buf.copy_(x), "sum", name))
        if hasattr(ops, "fused_all_gather_matmul"):
            ag, outs = ops.fused_all_gather_matmul(shard, [w.t()], 0, name)
            ref = wait(funcol.all_gather_tensor(shard, 0, group)) @ w.t()
            err = float((outs[0] - ref).abs().max() / ref.abs().max())
            rows[f"symm fused_all_gather_matmul (rel. err {err:.1e})"] = timed(
                lambda: ops.fused_all_gather_matmul(shard, [w.t()], 0, name))
        if hasattr(ops, "fused_matmul_reduce_scatter"):
            xs = x.flatten(0, 1)  # (B T, D): the partial sums of a row-parallel layer
            rows["mm + nccl reduce_scatter dim 0"] = timed(lambda: wait(funcol.reduce_scatter_tensor(xs @ w.t(), "sum", 0, group)))
            rows["symm fused_matmul_reduce_scatter"] = timed(
                lambda: ops.fused_matmul_reduce_scatter(xs, w.t(), "sum", 0, name))
    except Exception as e:  # noqa: BLE001  (report it, keep the NCCL rows)
        rows[f"symmetric memory failed: {type(e).__name__}: {str(e)[:200]}"] = float("nan")
    if dist.get_rank() == 0:
        for k, ms in rows.items():
            print(f"{ms:8.3f} ms  {k}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
