"""Does torch's NCCL point-to-point path survive CUDA graph capture on this machine? One GPU, one process.

The pipeline's graphed step (megaflow/step_graph.py under parallel.pp > 1) captures, per message, one
`dist.batch_isend_irecv` on the link's own group (parallel/pipeline_comm.py) and `work.wait()`s it later in the
same step. With one GPU there is no peer, so this probe sends to itself (NCCL allows it when the send and the
receive are in one group call): per "micro-batch" a GEMM, the message out and back through two groups ("act",
"grad"), a GEMM on what came back; captured after two eager warm-up steps on a side stream, as StepGraph does,
then replayed on fresh inputs against the eager result. It proves the capture mechanics (coalesced p2p, its
waits as stream joins, the watchdog beside a capture), not the two-rank schedule's ordering, which
parallel/schedules.py checks by simulation.

    torchrun --nproc_per_node 1 tools/device/pp_capture_probe.py          # on a GPU machine
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def message(x: torch.Tensor, group) -> torch.Tensor:
    """x to this rank and back in one batch on `group`: the copy that arrived (gloo sends nothing to itself:
    on the CPU, a copy, to check the rest of this script)."""
    if x.device.type != "cuda":
        return x.clone()
    out = torch.empty_like(x)
    me = dist.get_rank()
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, me, group), dist.P2POp(dist.irecv, out, me, group)])
    for w in works:
        w.wait()
    return out


def step(x: torch.Tensor, w: torch.Tensor, groups: list, micro_batches: int = 4) -> torch.Tensor:
    """(m * b, d) -> (m * b, d): per micro-batch a GEMM, a round trip on each group, another GEMM."""
    outs = []
    for mb in x.chunk(micro_batches):  # (b, d)
        h = mb @ w
        for g in groups:
            h = message(h, g) @ w
        outs.append(h)
    return torch.cat(outs)


def main() -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    groups = [dist.new_group([0]), dist.new_group([0])]  # "act" and "grad": one communicator each
    w = torch.randn(1024, 1024, device=dev, dtype=dtype) / 32
    x = torch.randn(4 * 512, 1024, device=dev, dtype=dtype)
    want = step(x, w, groups)
    if dev.type != "cuda":
        print(f"probe (CPU, no capture): eager step ran, output {tuple(want.shape)}", flush=True)
        return
    side = torch.cuda.Stream()
    for _ in range(2):  # eager warm-up on a side stream, as megaflow/step_graph.py does
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(x, w, groups)
        torch.cuda.current_stream().wait_stream(side)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_x, w, groups)
    ok = True
    for i in range(3):
        fresh = torch.randn_like(x)
        static_x.copy_(fresh)
        graph.replay()
        ref = step(fresh, w, groups)
        same = torch.equal(static_out, ref)
        ok = ok and same
        print(f"replay {i}: equals the eager step bitwise: {same}", flush=True)
    torch.cuda.synchronize()
    del graph, static_out  # before the communicators go: on 2 H200s (torch 2.11) the first run of this probe, which
    # kept its graph alive through destroy_process_group, printed its result and then did not exit
    print(f"PROBE p2p capture: {'OK' if ok else 'MISMATCH'} (torch {torch.__version__}, NCCL "
          f"{'.'.join(map(str, torch.cuda.nccl.version()))})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
