"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism, created once and handed
out explicitly. Nothing here is module-global: with two streams, a global "the TP group" would
silently hand the wrong group to one of them.

Rank order (Megatron's): TP is fastest-varying, then DP, then PP:
    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
so TP peers are adjacent ranks (one node, fast links) and pipeline stages are farthest apart.
The flow stream may use a smaller TP degree (`flow_tp`, dividing `tp`): its group is the set of
`flow_tp` adjacent ranks inside the TP group; the flow stream's weights are then replicated
`tp // flow_tp` times inside the TP group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


FP8_RECIPES = ("off", "delayed", "current")
FP8_BACKENDS = ("te", "torch")


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout. The data-parallel degree is what the world size leaves: dp = world / (tp * pp)."""
    tp: int = 1  # tensor-parallel degree (VLM stream and shared parts)
    flow_tp: int = 0  # tensor-parallel degree of the flow stream; 0 = same as tp
    pp: int = 1  # pipeline-parallel degree (stages)
    sequence_parallel: bool = False  # shard activations along the sequence in norm regions (needs tp > 1)
    async_tp: bool = False  # overlap TP collectives with GEMMs (parallel/async_tp.py): with sequence_parallel each all-gather / reduce-scatter with its GEMM; without, each column-parallel layer's input-gradient all-reduce with its weight-gradient GEMM
    tp_overlap: int = 0  # >= 2: each block's attention and MLP run on this many row chunks of the batch (2: halves), so one chunk's row-parallel all-reduce (SP: reduce-scatter) runs while the next computes (Megatron's / Domino's TP overlap; parallel/tp_overlap.py); 0 = off
    tp_comm_reorder: str = "auto"  # compiled TP graphs launch each collective when its input is ready and wait where its result is first used (inductor's raise_comms / sink_waits; parallel/tp_overlap.py raise_collectives). 'auto': on with tp_overlap (without it the chunks' collectives overlap nothing once compiled), off otherwise (plain TP's order with it on is not yet measured on GPUs); 'on' / 'off'
    tp_all_reduce: str = "nccl"  # TP's critical-path all-reduces on CUDA: 'nccl', or 'symm' (torch's two-shot symmetric-memory all-reduce over NVLink, parallel/comm.py)
    backend: str = "local"  # layer backend: 'local' (torch.distributed) or 'te' (Transformer Engine)
    fp8: str = "off"  # FP8 GEMMs of the transformer blocks (on a GPU with FP8): 'off', 'delayed' or 'current' scaling
    fp8_backend: str = "te"  # who runs FP8: 'te' (Transformer Engine layers, backend 'te') or 'torch' (torch._scaled_mm linears compiled with the blocks, backend 'local', scaling 'current' or 'delayed'; megaflow/fp8.py)
    fp8_min_dim: int = 2048  # fp8_backend 'torch': a block linear runs in FP8 only when both its dimensions are >= this (the width-256 shallow flows are launch-bound: nothing to gain; docs/benchmarks.md)
    fp8_fast_accum: bool = False  # fp8_backend 'torch': the forward GEMM accumulates fast (no periodic fp32 promotion), as Transformer Engine and torchao do (no gain measured on the H200: docs/benchmarks.md); the gradient GEMMs always promote
    fp8_split_dy: bool = False  # fp8_backend 'torch': the backward's transposed FP8 copy of each FP8 linear's output gradient dy (for dW) made by its own kernel (megaflow/fp8.fp8_transpose), not fused by inductor into dy's cast
    fp8_start_step: int = 0  # fp8_backend 'torch': the steps before this one run the FP8 layers' GEMMs in bf16 (e.g. the LR warm-up, where FP8's curve left BF16's on the ~3B config); needs train.step_graph=off
    fp8_bf16_ends: int = 0  # fp8_backend 'torch': the first and the last this many VLM blocks keep bf16 GEMMs (the accuracy lever of NVIDIA's FP8 recipes)
    fp8_one_read: str = ""  # fp8_backend 'torch': the operands ('x', 'w', 'dy', joined by '+', e.g. 'w+dy') whose FP8 copies in both layouts (row-major and the transposed one a backward GEMM needs) one Triton kernel writes from one read of the bf16 tensor (megaflow/fp8_kernels.py; the same bytes as without; 'x' replaces fp8_split_transpose, 'dy' fp8_split_dy; 'xo': x of the output projections only, whose input no norm makes)
    fp8_split_transpose: bool = False  # fp8_backend 'torch': the backward's transposed FP8 copy of each FP8 linear's input is made in the forward by its own kernel (megaflow/fp8.fp8_transpose) and saved (1 byte an element), not fused by inductor into the norm + cast kernel that makes the input (~3B config: 398 -> 390 ms a step for 4.9 GiB, docs/benchmarks.md)
    schedule: str = "1f1b"  # pipeline schedule: '1f1b' or 'interleaved'
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    micro_batches: int = 1  # micro-batches per step (gradient accumulation / pipeline fill)
    grad_accum_fusion: str = "auto"  # each linear's weight-gradient GEMM adds straight into its fp32 main gradient (no bf16 .grad, no flush after each micro-batch; parallel/wgrad_fusion.py): 'auto' (CUDA, bf16 weights, micro_batches > 1, no data or tensor parallelism: every graphed pipeline of h200_1b; one H200, 8 x 4-row micro-batches: 369.6 -> 355.9 ms a step, docs/benchmarks.md), 'on' or 'off'
    stage_layout: str = ""  # manual split: units per stage, e.g. '3,5' ('' = balanced by cost)
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0 = no ZeRO)
    overlap: bool = True  # overlap communication with compute: DP buckets reduced during backward, PP receives posted ahead
    bucket_mb: float = 200.0  # data-parallel gradient bucket (MiB of fp32 gradients) of one all-reduce, without ZeRO (on 2 H200s DP2 weak scaling 94.5-95.3% at 200 vs 90.7-91.2% at 25: fewer all-reduces take less from the backward they overlap, docs/benchmarks.md)
    dp_comm_ctas: int = 0  # NCCL: at most this many CTAs (SMs) run the data-parallel gradient all-reduce, leaving the rest to the backward it overlaps (0 = NCCL's choice; 8 was slower on 2 H200s: the all-reduces stretch past the backward)
    last_bucket_mb: float = 0.0  # > 0: the last data-parallel bucket holds only the model's first parameters, at most this many MiB (their gradients are ready last: its all-reduce is the one backward cannot hide); 0 = every bucket up to bucket_mb (40 gained nothing for h200_1b's graphed DP2 on 2 H200s, docs/benchmarks.md)
    dp_comm_priority: bool = False  # NCCL: the data-parallel gradient all-reduce runs on a high-priority stream (its kernels scheduled ahead of the backward's; kept per kernel inside train.step_graph's CUDA graph; no gain for h200_1b's DP2 on 2 H200s)
    dp_shard_optimizer: str = "auto"  # the distributed optimizer (parallel/dist_optimizer.py): gradient buckets reduce-scattered during backward, AdamW on this rank's shard only, the bf16 weights all-gathered; checkpoints as without it. 'auto': on where it applies (dp > 1 with tp = pp = 1, no ZeRO, bf16 weights: DP2 95.6% vs 94.1% of one GPU on 2 H200s, docs/benchmarks.md), else off; 'on': refused where it does not apply; 'off': the all-reduce path
    timeout_s: float = 600.0  # seconds a collective or the start-up rendezvous waits for the other ranks before the run fails (a dead or hung rank ends the job)

    def __post_init__(self):
        for name in ("tp", "pp", "virtual_stages", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.flow_tp < 0 or (self.flow_tp and self.tp % self.flow_tp):
            raise ValueError(f"parallel.flow_tp={self.flow_tp} must divide parallel.tp={self.tp} (or be 0)")
        if self.backend not in ("local", "te"):
            raise ValueError(f"parallel.backend={self.backend!r} must be 'local' or 'te'")
        if self.fp8 not in FP8_RECIPES:
            raise ValueError(f"parallel.fp8={self.fp8!r} must be one of {FP8_RECIPES}")
        if self.fp8_backend not in FP8_BACKENDS:
            raise ValueError(f"parallel.fp8_backend={self.fp8_backend!r} must be one of {FP8_BACKENDS}")
        if self.fp8 != "off" and self.fp8_backend == "te" and self.backend != "te":
            raise ValueError(f"parallel.fp8={self.fp8!r} runs through Transformer Engine: set parallel.backend=te "
                             "(on a GPU with FP8, e.g. H100/H200), or parallel.fp8_backend=torch, or parallel.fp8=off")
        if self.fp8 != "off" and self.fp8_backend == "torch":
            if self.backend != "local":
                raise ValueError("parallel.fp8_backend='torch' replaces our own linears: set parallel.backend=local "
                                 "(or fp8_backend=te to keep Transformer Engine layers)")
            if self.fp8_start_step < 0:
                raise ValueError(f"parallel.fp8_start_step={self.fp8_start_step} must be >= 0 (0: FP8 from the first step)")
            if self.fp8_bf16_ends < 0:
                raise ValueError(f"parallel.fp8_bf16_ends={self.fp8_bf16_ends} must be >= 0 (VLM blocks kept in bf16 "
                                 "at each end)")
            bad = set(self.fp8_one_read_operands) - {"x", "xo", "w", "dy"}
            if bad:
                raise ValueError(f"parallel.fp8_one_read={self.fp8_one_read!r}: {sorted(bad)} not among 'x', 'xo', 'w', 'dy' "
                                 "(joined by '+', e.g. 'w+dy'; '' for none)")
            if self.fp8_min_dim < 16:
                raise ValueError(f"parallel.fp8_min_dim={self.fp8_min_dim} must be >= 16 (FP8 GEMM dimensions)")
            if self.async_tp:
                raise ValueError("parallel.async_tp=true runs its overlapped GEMMs in bf16, not through "
                                 "fp8_backend='torch''s FP8 GEMM; set async_tp=false for FP8 under tensor parallelism")
        if self.async_tp and self.backend != "local":
            raise ValueError(f"parallel.async_tp=true overlaps the local backend's collectives; with "
                             f"parallel.backend={self.backend!r} set async_tp=false (Transformer Engine's layers "
                             f"communicate themselves)")
        self._auto_on_off("tp_comm_reorder", bools=True)
        if self.tp_overlap < 0 or self.tp_overlap == 1:
            raise ValueError(f"parallel.tp_overlap={self.tp_overlap} must be 0 (off) or the number of row chunks (>= 2)")
        if self.tp_overlap and self.backend != "local":
            raise ValueError(f"parallel.tp_overlap={self.tp_overlap} splits the local backend's blocks; with parallel."
                             f"backend={self.backend!r} set tp_overlap=0 (Transformer Engine's layers communicate themselves)")
        if self.tp_overlap and self.async_tp and self.sequence_parallel:
            raise ValueError(f"parallel.tp_overlap={self.tp_overlap} defers the row-parallel reduce-scatters that "
                             f"parallel.async_tp fuses with their GEMMs under sequence_parallel; set tp_overlap=0 or "
                             f"async_tp=false")
        if self.tp_all_reduce not in ("nccl", "symm"):
            raise ValueError(f"parallel.tp_all_reduce={self.tp_all_reduce!r} must be 'nccl' or 'symm'")
        self._auto_on_off("grad_accum_fusion")
        if self.schedule not in ("1f1b", "interleaved"):
            raise ValueError(f"parallel.schedule={self.schedule!r} must be '1f1b' or 'interleaved'")
        if self.bucket_mb <= 0:
            raise ValueError(f"parallel.bucket_mb={self.bucket_mb} must be > 0 (MiB per gradient all-reduce)")
        if self.dp_comm_ctas < 0:
            raise ValueError(f"parallel.dp_comm_ctas={self.dp_comm_ctas} must be >= 0 (0 = NCCL's choice)")
        if self.last_bucket_mb < 0:
            raise ValueError(f"parallel.last_bucket_mb={self.last_bucket_mb} must be >= 0 (0 = no smaller last bucket)")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s={self.timeout_s} must be > 0 (seconds)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        self._auto_on_off("dp_shard_optimizer", bools=True)
        if self.dp_shard_optimizer == "on" and (self.zero_stage or self.tp > 1 or self.pp > 1):
            raise ValueError(f"parallel.dp_shard_optimizer=on shards the optimizer over data parallelism alone; this "
                             f"run has zero_stage={self.zero_stage}, tp={self.tp}, pp={self.pp}: set "
                             f"parallel.dp_shard_optimizer=auto or off (or zero_stage=0, tp=1, pp=1)")

    def _auto_on_off(self, name: str, bools: bool = False) -> None:
        """Check a field that is 'auto', 'on' or 'off'; `bools`: a bool (from Python callers that passed
        one before the field had 'auto') stands for 'on' / 'off'."""
        value = getattr(self, name)
        if bools and isinstance(value, bool):
            value = "on" if value else "off"
            object.__setattr__(self, name, value)  # frozen
        if value not in ("auto", "on", "off"):
            raise ValueError(f"parallel.{name}={value!r} must be 'auto', 'on' or 'off'")

    @property
    def comm_reorder(self) -> bool:
        """Whether compiled TP graphs reorder their collectives (parallel.tp_comm_reorder; 'auto': with tp_overlap)."""
        return self.tp_comm_reorder == "on" or (self.tp_comm_reorder == "auto" and self.tp_overlap >= 2)

    def shard_optimizer(self, bf16_weights: bool) -> bool:
        """Whether data parallelism runs the distributed optimizer: 'on', or 'auto' where it applies (no
        ZeRO, tp = pp = 1, bf16 weights: its buckets are slices of the flat fp32 main-gradient buffer)."""
        if self.dp_shard_optimizer == "auto":
            return bf16_weights and not (self.zero_stage or self.tp > 1 or self.pp > 1)
        return self.dp_shard_optimizer == "on"

    @property
    def te_fp8(self) -> str:
        """The FP8 recipe Transformer Engine runs ('off' when FP8 is off or runs on torch's own linears)."""
        return self.fp8 if self.fp8_backend == "te" else "off"

    @property
    def fp8_one_read_operands(self) -> tuple:
        """parallel.fp8_one_read as a tuple ('w+dy' -> ('w', 'dy'))."""
        return tuple(o.strip() for o in self.fp8_one_read.replace(",", "+").split("+") if o.strip())

    @property
    def torch_fp8(self) -> bool:
        """FP8 on torch's own linears (megaflow/fp8.py), swapped in by parallel.backend.apply_fp8_layers."""
        return self.fp8 != "off" and self.fp8_backend == "torch"


class Topology:
    """This rank's coordinates and its TP / flow-TP / PP / DP groups.

    Every rank must construct it (it calls `dist.new_group` for every group, in the same order on
    all ranks, as torch.distributed requires). Without an initialised process group, or with a
    world of one, all groups are None and every degree is 1.
    """

    def __init__(self, tp: int = 1, pp: int = 1, flow_tp: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        initialised = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        flow_tp = flow_tp or tp
        if self.world_size % (tp * pp):
            raise ValueError(f"world size {self.world_size} is not divisible by tp * pp = {tp} * {pp}; "
                             f"launch a multiple of {tp * pp} processes or change parallel.tp / parallel.pp")
        if tp % flow_tp:
            raise ValueError(f"flow_tp={flow_tp} must divide tp={tp}")
        self.tp, self.pp, self.flow_tp = tp, pp, flow_tp
        self.dp = self.world_size // (tp * pp)
        r = self.rank
        self.tp_rank = r % tp
        self.dp_rank = (r // tp) % self.dp
        self.pp_rank = r // (tp * self.dp)
        self.flow_tp_rank = self.tp_rank % flow_tp
        self.tp_group = self.flow_tp_group = self.pp_group = self.dp_group = None
        self.amax_group = None  # TP x DP ranks of this pipeline stage: where FP8 delayed scaling reduces amaxes
        self.tp_ranks = self._tp_ranks(self.pp_rank, self.dp_rank)
        self.pp_ranks = [p * tp * self.dp + self.dp_rank * tp + self.tp_rank for p in range(pp)]
        self.dp_ranks = [self.pp_rank * tp * self.dp + d * tp + self.tp_rank for d in range(self.dp)]
        if self.world_size > 1 and initialised:
            self._build_groups()

    def _tp_ranks(self, p: int, d: int) -> list:
        base = p * self.tp * self.dp + d * self.tp
        return list(range(base, base + self.tp))

    def _build_groups(self):
        tp, pp, dp = self.tp, self.pp, self.dp
        for p in range(pp):
            for d in range(dp):
                ranks = self._tp_ranks(p, d)
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self.tp_group = g
                for s in range(0, tp, self.flow_tp):
                    sub = ranks[s:s + self.flow_tp]
                    g = dist.new_group(sub)
                    if self.rank in sub:
                        self.flow_tp_group = g
        for d in range(dp):
            for t in range(tp):
                ranks = [p * tp * dp + d * tp + t for p in range(pp)]
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self.pp_group = g
        for ranks in self.dp_rank_lists():
            g = dist.new_group(ranks)
            if self.rank in ranks:
                self.dp_group = g
        for p in range(pp):  # the ranks that hold the same layers (TE's fp8_group, as Megatron's amax group)
            ranks = list(range(p * tp * dp, (p + 1) * tp * dp))
            g = dist.new_group(ranks) if pp > 1 else dist.group.WORLD
            if self.rank in ranks:
                self.amax_group = g

    def dp_rank_lists(self) -> list:
        """The ranks of every data-parallel group, in the order the groups are created."""
        tp, pp, dp = self.tp, self.pp, self.dp
        return [[p * tp * dp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def __repr__(self):
        return (f"Topology(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp}, "
                f"flow_tp={self.flow_tp_rank}/{self.flow_tp}, dp={self.dp_rank}/{self.dp}, pp={self.pp_rank}/{self.pp})")
