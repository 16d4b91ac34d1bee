"""DeepSpeed's view of our Topology: the Megatron-style "mpu" object it asks for groups, and the
parameter attributes its gradient norm reads to count every element once across TP and PP.

Not here: the engine (parallel/zero.py).
"""
from __future__ import annotations

import torch.distributed as dist

from parallel.checkpoint_tp import shard_layout


class TopologyMPU:
    """The Megatron-style "mpu" DeepSpeed asks for, answering from our Topology: the data-parallel
    group ZeRO partitions over, and the model-parallel group (all TP x PP ranks of one data-parallel
    replica) its gradient norm is summed over. Every rank must construct it (it creates groups)."""

    def __init__(self, topo):
        self.topo = topo
        self.mp_group = None
        replica = topo.tp * topo.pp
        for d in range(topo.dp):
            ranks = [p * topo.tp * topo.dp + d * topo.tp + t for p in range(topo.pp) for t in range(topo.tp)]
            g = dist.new_group(ranks) if replica > 1 else None
            if topo.rank in ranks:
                self.mp_group, self.mp_ranks = g, ranks

    def get_data_parallel_group(self):
        return self.topo.dp_group or dist.group.WORLD  # None only in a world of one process

    def get_data_parallel_rank(self):
        return self.topo.dp_rank

    def get_data_parallel_world_size(self):
        return self.topo.dp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self):
        return self.topo.pp_rank * self.topo.tp + self.topo.tp_rank

    def get_model_parallel_world_size(self):
        return self.topo.tp * self.topo.pp

    def get_tensor_model_parallel_group(self):
        return self.topo.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.topo.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.topo.tp

    def get_tensor_model_parallel_src_rank(self):
        return self.topo.tp_ranks[0]

    def get_pipeline_model_parallel_group(self):
        return self.topo.pp_group

    def get_pipeline_model_parallel_world_size(self):
        return self.topo.pp

    def get_pipeline_model_parallel_rank(self):
        return self.topo.pp_rank


def mark_model_parallel(named_params: dict, topo, tied_copy=None) -> None:
    """Tell DeepSpeed's norm which parameters to count on this rank, so that the global norm (summed
    over DP, TP and PP) counts every element once: TP shards everywhere (`tensor_model_parallel`);
    replicated parameters on TP rank 0 only (DeepSpeed's default); flow shards replicated tp/flow_tp
    times, and the LM-head copy of embeddings tied across pipeline stages, not at all
    (`ds_pipe_replicated`)."""
    layouts = {}
    for name, (p, module) in named_params.items():
        if id(module) not in layouts:
            layouts[id(module)] = shard_layout(module)
        layout = layouts[id(module)]
        if name in layout:
            p.tensor_model_parallel = True
            group = layout[name][1]
            if group is topo.flow_tp_group and topo.flow_tp < topo.tp and topo.tp_rank >= topo.flow_tp:
                p.ds_pipe_replicated = True
    if tied_copy is not None:
        tied_copy.ds_pipe_replicated = True
