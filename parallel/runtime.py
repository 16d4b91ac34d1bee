"""Start a multi-process `megaflow train`: read the launcher's environment, create the process group
and the Topology, and build this rank's part of the model and its engine in the one build order:

    meta build -> apply_tp -> curriculum (requires_grad) -> split_stages -> materialise:
    init (init_stages, a seed per TP rank, replicas synced) or load a FULL state dict (sliced per TP
    rank, cut per stage) -> TiedEmbeddings -> engine (ZeroEngine, or ParallelEngine without ZeRO)

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM's srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT exported by the job
script). Backend: NCCL on CUDA (device = LOCAL_RANK), gloo on CPU. Every collective, and the
start-up rendezvous, gives up after parallel.timeout_s: a rank that died or hangs (SIGSTOP, a stuck
GPU) ends the others with an error instead of a silent wait (NCCL needs
TORCH_NCCL_ASYNC_ERROR_HANDLING=1, which the launchers export).

Not here: the loop (megaflow/train.py), checkpoint files (parallel/checkpoint.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megaflow.model.starflow import STARFlow2, apply_stage
from parallel.checkpoint_tp import load_full_state_dict
from parallel.pipeline import FIRST_PARAMS, TiedEmbeddings, init_stages, load_stages, split_stages
from parallel.tensor_parallel import sync_replicas
from parallel.topology import Topology


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> Optional[LaunchEnv]:
    """This process's place in a multi-process launch, or None for a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        if world > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
            raise RuntimeError("srun with SLURM_NTASKS={} but MASTER_ADDR / MASTER_PORT are not set; export them in "
                               "the job script, e.g. MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | "
                               "head -n1) MASTER_PORT=29500".format(world))
    else:
        return None
    return LaunchEnv(rank, world, local) if world > 1 else None


def init_distributed(launch: LaunchEnv, device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Create the default process group (NCCL on CUDA, gloo on CPU) whose collectives and start-up
    wait at most `timeout_s` for the other ranks; returns this rank's device."""
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={launch.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                               f"launch at most that many processes per node")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Groups made later without a timeout (Topology's, the pipeline's, ZeRO's) take torch's module
        # default (30 min gloo, 10 min NCCL), not the world's: make parallel.timeout_s that default.
        import torch.distributed.distributed_c10d as c10d
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank,
                                    world_size=launch.world_size, timeout=timedelta(seconds=timeout_s))
        except dist.DistError as e:  # a peer that died or never started: say so, not a 30-minute wait
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RuntimeError(f"rank {launch.rank}: the {launch.world_size} ranks did not all join at {where} "
                               f"within parallel.timeout_s={timeout_s:g} s ({e}); check that every rank started "
                               f"(its log), or raise parallel.timeout_s for slow starts") from e
    return device


class AnyRank:
    """Per step boundary: whether any rank holds a flag (a stop signal, rank 0's clock over
    train.max_minutes). One all-reduce of a few numbers on the CPU, over a gloo group (the default
    group on CPU; a second one under NCCL, so the GPU's queue is never waited for)."""

    def __init__(self, topo: Optional[Topology], timeout_s: float = 600.0):
        self.on = topo is not None and dist.is_initialized()
        self.group = None
        if self.on and dist.get_backend() != "gloo":  # every rank creates it, in the same order
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def __call__(self, *flags: bool) -> list:
        if not self.on:
            return [bool(f) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t.tolist()]


def is_node_main() -> bool:
    """Whether this process is the first of its node (or the only process): it prepares node-local files."""
    launch = launch_env()
    return launch is None or launch.local_rank == 0


def check_layout(pcfg, world_size: int, mcfg=None) -> None:
    """A ValueError that says what to launch when `world_size` processes cannot hold the layout, or
    (given the model config `mcfg`) why Transformer Engine's FP8 GEMMs cannot serve it."""
    tp, pp = pcfg.tp, pcfg.pp
    if world_size % (tp * pp):
        raise ValueError(f"{world_size} processes cannot be split into tensor-parallel groups of parallel.tp={tp} "
                         f"times pipeline groups of parallel.pp={pp}: launch a multiple of tp * pp = {tp * pp} "
                         f"processes (the data-parallel degree is world / (tp * pp))")
    if pcfg.zero_stage > 1 and pp > 1:
        raise ValueError(f"parallel.zero_stage={pcfg.zero_stage} with parallel.pp={pp}: ZeRO-2/3 cannot run under "
                         f"the pipeline schedule; use zero_stage=1 (or pp=1)")
    if mcfg is not None:
        from parallel.backend import te_layout_problem
        problem = te_layout_problem(mcfg, pcfg)
        if problem:
            raise ValueError(problem)


@torch.no_grad()
def sync_tp_replicas(stages: list, topo: Topology) -> None:
    """After a per-TP-rank init: replicated entries equal TP rank 0's, flow shards replicated
    tp / flow_tp times equal their first copy (parallel.tensor_parallel.init_tp_weights, per stage)."""
    for st in stages:
        sync_replicas(st.module, topo)


def build_stages(mcfg, pcfg, topo: Topology, device, seed: int, full_state: Optional[dict] = None,
                 seq_len: int = 2048):
    """(model, stages, tied): the meta-built model (this rank's parts materialised; the whole model
    when pp == 1), this rank's pipeline stages and the tied-embedding link. `full_state`: a full
    (single-process) state dict to load, else a fresh init (with pp == tp == 1 the same numbers as
    one process with the same seed)."""
    with torch.device("meta"):
        model = STARFlow2(mcfg)
    if topo.tp > 1:
        from parallel.tensor_parallel import apply_tp
        apply_tp(model, topo, pcfg)
    apply_stage(model, mcfg.stage)
    stages = split_stages(model, topo.pp, topo.pp_rank, pcfg.schedule, pcfg.virtual_stages, pcfg.micro_batches,
                          pcfg.stage_layout, seq_len, verbose=topo.rank == 0)
    if full_state is None:
        init_stages(model, stages, device, seed + 7919 * topo.tp_rank)
        sync_tp_replicas(stages, topo)
    else:
        load_stages(stages, full_state, device, loader=lambda m, sd: load_full_state_dict(m, sd, strict=False))
        for st in stages:  # the view holds the materialised top-level parameters; so does the model
            for name in FIRST_PARAMS:
                if st.module._parameters.get(name) is not None:
                    model._parameters[name] = st.module._parameters[name]
    from parallel.backend import apply_fp8_layers  # this rank's blocks: unsharded TE linears (TP=1) or FP8 GEMMs
    for st in stages:
        apply_fp8_layers(st.module, pcfg, device, mcfg)
    tied = TiedEmbeddings(stages, topo)
    if full_state is None:
        tied.broadcast()
    return model, stages, tied


def build_engine(cfg, model, stages: list, tied, topo: Topology, dtype):
    """ZeroEngine when parallel.zero_stage > 0, else ParallelEngine."""
    if cfg.parallel.zero_stage > 0:
        from parallel.zero import ZeroEngine
        if topo.pp == 1:
            return ZeroEngine(model, cfg, dtype, topo)
        return ZeroEngine(None, cfg, dtype, topo, stages=stages, tied=tied)
    from parallel.engine import ParallelEngine
    return ParallelEngine(stages, cfg, dtype, topo, tied)


def barrier(topo: Optional[Topology]) -> None:
    if topo is not None and dist.is_initialized():
        dist.barrier()


def broadcast_value(value, topo: Optional[Topology]):
    """Rank 0's `value` (any picklable object) on every rank."""
    if topo is None:
        return value
    box = [value if topo.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
