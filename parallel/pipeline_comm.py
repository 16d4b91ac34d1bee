"""Point-to-point transport of the stage state tuple between pipeline ranks.

One process group per directed link and direction of travel (activations r -> r+1, gradients
r+1 -> r, and the wrap-around links pp-1 -> 0 / 0 -> pp-1 of the interleaved schedule). On NCCL
all point-to-point traffic of one group runs on one stream in issue order and is matched by order,
not by tag; giving every direction its own group means a link only ever carries messages one way,
in the order the schedule sends them, which parallel/schedules.py checks equals the order the
receiver asks for them. Sends are asynchronous (kept until `wait_sends`); receives can be posted
ahead (`post_recv`, waited on later) or block (`recv`); the tensors of one message travel in one
`batch_isend_irecv`. With the schedules' action order this cannot deadlock (also checked there, by
simulation); posting a receive early keeps each link's receive order, so messages still match.

Shapes are not exchanged: every rank of a pipeline holds the same micro-batch, so the state's
shapes (b, T, Dv), (b, T, Df), (b, T, D), (b, 2) follow from the batch and the config. A zero-width
tensor (h_vlm of a TarFlow-only model) is not sent at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class PipelineComm:
    """Every rank must construct it, in the same order (it creates groups for all pipelines)."""

    def __init__(self, topo, interleaved: bool = False):
        self.topo, self.pending = topo, []
        self.groups = {}  # (kind, src_pp_rank, dst_pp_rank) -> group of my pipeline
        pp, tp, dp = topo.pp, topo.tp, topo.dp
        if pp == 1:
            return
        links = [(i, i + 1) for i in range(pp - 1)]
        if interleaved:
            links.append((pp - 1, 0))
        for d in range(dp):
            for t in range(tp):
                ranks = [p * tp * dp + d * tp + t for p in range(pp)]
                for a, b in links:
                    for kind, src, dst in (("act", a, b), ("grad", b, a)):
                        g = dist.new_group([ranks[src], ranks[dst]])
                        if topo.rank in (ranks[src], ranks[dst]):
                            self.groups[(kind, src, dst)] = g
        self._warm_up()

    def _warm_up(self):
        """NCCL creates communicators lazily, and connects a link's point-to-point channel at its first
        send/recv, each a handshake that blocks both peers' hosts; do both now, in one order on all
        ranks (one message each way a link carries), rather than in the middle of a schedule. There,
        with receives posted ahead, a rank blocked in the handshake of a receive posted early cannot
        send what its peer waits for, and a peer that synchronises the device meanwhile (inductor
        autotunes each new kernel at its first launch) waits on its own early receive: a deadlock in
        the first step. PP2 runs on 2 H200s that stalled in their first step ran once this and the
        schedule's first-step rule (pipeline_step.py) were in (docs/benchmarks.md, issue 17)."""
        dev = _device()
        for key in sorted(self.groups):
            group, (_, src, dst) = self.groups[key], key
            dist.all_reduce(torch.zeros(1, device=dev), group=group)
            me = self.topo.pp_rank
            op = (dist.isend, dst) if me == src else (dist.irecv, src)
            for work in dist.batch_isend_irecv([dist.P2POp(op[0], torch.zeros(1, device=dev), self._peer(op[1]), group)]):
                work.wait()

    def _peer(self, pp_rank: int) -> int:
        return self.topo.pp_ranks[pp_rank]

    def send(self, tensors: tuple, kind: str, dst_pp_rank: int) -> None:
        """Asynchronous: the tensors of one message go out in one batch (one NCCL group call)."""
        group = self.groups[(kind, self.topo.pp_rank, dst_pp_rank)]
        peer = self._peer(dst_pp_rank)
        ts = [t.detach().contiguous() for t in tensors if t.numel()]
        if ts:
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer, group) for t in ts])
            self.pending += [(w, ts) for w in works]

    def post_recv(self, shapes: list, dtype, device, kind: str, src_pp_rank: int) -> "Received":
        """Post the receives of one message now (one batch) and return at once; `.wait()` gives the
        tensors. `dtype`: one for all tensors, or a list (one per shape, e.g. `state_dtypes`)."""
        group = self.groups[(kind, src_pp_rank, self.topo.pp_rank)]
        peer = self._peer(src_pp_rank)
        dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
        out = tuple(torch.empty(shape, dtype=dt, device=device) for shape, dt in zip(shapes, dtypes))
        ops = [dist.P2POp(dist.irecv, t, peer, group) for t in out if t.numel()]
        return Received(out, dist.batch_isend_irecv(ops) if ops else [])

    def recv(self, shapes: list, dtype, device, kind: str, src_pp_rank: int) -> tuple:
        """Blocking form of `post_recv`."""
        return self.post_recv(shapes, dtype, device, kind, src_pp_rank).wait()

    def wait_sends(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class Received:
    """Receives in flight: `wait()` returns the tensors once they have arrived (on NCCL: the current
    stream waits for them, the host does not)."""

    def __init__(self, tensors: tuple, works: list):
        self.tensors, self.works = tensors, works

    def wait(self) -> tuple:
        for w in self.works:
            w.wait()
        self.works = []
        return self.tensors


def state_shapes(model, batch_size: int, seq_len: int) -> list:
    """Shapes of the state tuple (h_vlm, h_flow, flow_x, flow_aux) for a micro-batch. Under sequence
    parallelism (the model's `seq_split` hook holds a tp_group) the two streams carry T / tp rows."""
    cfg = model.cfg
    dv = cfg.vlm.dim if cfg.vlm is not None else 0
    sp_group = getattr(model.seq_split, "tp_group", None)
    t = seq_len // (dist.get_world_size(sp_group) if sp_group is not None else 1)
    return [(batch_size, t, dv), (batch_size, t, cfg.flow.dim),
            (batch_size, seq_len, cfg.fae.latent_dim), (batch_size, 2)]


def state_dtypes(model) -> list:
    """Dtypes of the state tuple: the two streams in the model's parameter dtype (bf16 under mixed
    precision), the deep flow's input variable and the log-det sums always in fp32."""
    act = model.flow_in.weight.dtype
    wide = torch.promote_types(act, torch.float32)
    return [act, act, wide, wide]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
