"""Tensor and sequence parallelism for STARFlow2, applied from outside to a built model.

`apply_tp(model, topo, cfg)` swaps layers of a STARFlow2 (on the meta device before
materialisation, or on a materialised model, whose weights it then shards). The model code is not
changed beyond two identity hooks, `seq_split` and `vocab_gather`, that this file replaces.

What goes where (tp = the VLM group, ftp = the flow group, `Topology.flow_tp_group`):
  VLM layers (tp)      fused qkv column-parallel by heads, each rank holding its q heads AND its k/v
                       heads (k/v replicated when n_kv_heads < tp; parallel/fused.py), o_proj
                       row-parallel; fused gate_up column (its gate rows and its up rows), down row.
                       Megatron's layout.
  flow layers (ftp)    the same; shallow-flow layers too (over one image's tokens, never SP).
  embed_tokens (tp)    vocab-parallel; lm_head column-parallel over the vocabulary and the loss
                       vocab-parallel (full logits are never gathered for it); `vocab_gather` gathers
                       them for sampling only. flow_embed (TarFlow-only, ftp) vocab-parallel.
  adapter (tp)         Linear column-parallel, GELU, Linear row-parallel.
  Pretzel skips        w_vlm, w_d replicated: without SP each rank computes the whole (small) skip
                       on the whole streams, with no collective (row-parallel, each skip cost an
                       all-reduce forward and an all-gather backward); under SP each rank computes
                       it on its own tokens, its weight gradient all-reduced (SequenceParallelLinear).
  replicated           flow_in, flow_start, gauss_head (2 x latent_dim outputs: too few to split),
                       shallow proj_in / proj_out / norm, the FAE.
With sequence parallelism the residual streams between layers are sharded along T (`seq_split`
after `embed`); norms run on local tokens (their weight gradients are all-reduced), the norm in front
of a parallel region all-gathers T, row-parallel layers reduce-scatter T. With `parallel.async_tp` the
column-parallel layer gathers its own input and each collective overlaps its GEMM (async_tp.py; without
SP its backward's all-reduce overlaps the weight gradient's GEMM). The embeddings and the
heads work on full T. Generation needs sequence_parallel=False (decoding feeds one token at a time).

Weight init after a meta build: `init_tp_weights` draws sharded weights per rank and broadcasts
replicated ones; to reproduce a single-process model exactly, load its full state dict instead
(checkpoint_tp.load_full_state_dict). `build_tp_model` is the build order in one function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megaflow.model.config import ModelConfig
from megaflow.model.layers import TransformerBlock
from megaflow.model.starflow import STARFlow2, apply_stage
from parallel.async_tp import enable_async_tp, enable_symm_all_reduce
from parallel.backend import get_backend
from parallel.checkpoint_tp import load_full_state_dict, shard_layout
from parallel.comm import all_gather, group_rank, group_size
from parallel.fused import parts_layout, pieces
from parallel.layers import (ColumnParallelLinear, ParallelRMSNorm, ReplicatedKVLinear, RowParallelLinear,
                             SequenceParallelLinear, SequenceSplit, VocabGather, VocabParallelEmbedding,
                             VocabParallelTextLoss)
from parallel.topology import ParallelConfig, Topology
from parallel.tp_overlap import apply_batch_chunks, raise_collectives


def check_tp(cfg: ModelConfig, tp: int, flow_tp: int = 0, sequence_parallel: bool = False) -> None:
    """Raise ValueError, naming the dimension and the degree, if the model cannot be split."""
    flow_tp = flow_tp or tp
    problems = []

    def need(name: str, value: int, degree: int, degree_name: str):
        if value % degree:
            problems.append(f"{name}={value} is not divisible by {degree_name}={degree}")

    v, f = cfg.vlm, cfg.flow
    if v is not None:
        need("vlm.n_heads (attention heads)", v.n_heads, tp, "parallel.tp")
        if v.n_kv_heads % tp and tp % v.n_kv_heads:
            problems.append(f"vlm.n_kv_heads (key/value heads)={v.n_kv_heads} is neither divisible by "
                            f"parallel.tp={tp} nor a divisor of it (to replicate them)")
        need("vlm.dim (hidden size)", v.dim, tp, "parallel.tp")
        need("vlm.ffn_dim (MLP size)", v.ffn_dim, tp, "parallel.tp")
        need("vlm.vocab_size (vocabulary)", v.vocab_size, tp, "parallel.tp")
    else:
        need("flow.n_cond_tokens (vocabulary)", cfg.vocab_size, flow_tp, "flow tp")
    need("flow.n_heads (attention heads)", f.n_heads, flow_tp, "flow tp")
    need("flow.dim (hidden size)", f.dim, flow_tp, "flow tp")
    need("flow.ffn_dim (MLP size)", f.ffn_dim, flow_tp, "flow tp")
    if f.n_shallow:
        need("flow.shallow_heads (attention heads)", f.shallow_heads, flow_tp, "flow tp")
        need("flow.shallow_ffn_dim (shallow MLP size)", f.shallow_ffn_dim or 4 * f.shallow_dim, flow_tp, "flow tp")
    if sequence_parallel and flow_tp != tp:
        problems.append(f"sequence parallelism needs one degree for both streams (parallel.flow_tp={flow_tp} "
                        f"differs from parallel.tp={tp}); set parallel.flow_tp=0 or sequence_parallel=false")
    if problems:
        raise ValueError("cannot split the model for tensor parallelism: " + "; ".join(problems)
                         + ". Choose degrees that divide these sizes.")


def parallelize_block(block: TransformerBlock, group, sequence_parallel: bool, backend, chunks: int = 0) -> None:
    """Megatron's split of one pre-norm block: heads for attention, the inner size for the MLP. The
    fused projections are split part by part; the attention's head counts become the local ones.
    `chunks` >= 2 (parallel.tp_overlap): attention and MLP on row chunks, their reductions overlapped."""
    n, rank = group_size(group), group_rank(group)
    attn, mlp, sp = block.self_attn, block.mlp, sequence_parallel
    n_kv, sizes = attn.n_kv_heads, attn.qkv_sizes()
    block.input_layernorm = backend.entry_norm(block.input_layernorm, group, sp)
    if n_kv % n == 0:
        attn.qkv = backend.column(attn.qkv, group, sp, parts=sizes)
        attn.n_kv_heads = n_kv // n
    else:  # fewer key/value heads than ranks: rank r's query heads all read kv head r // (n / n_kv)
        attn.qkv = ReplicatedKVLinear(attn.qkv, group, sizes, attn.head_dim, rank // (n // n_kv),
                                      backend.kv_input_comm(sp))
        attn.n_kv_heads = 1
    attn.n_heads //= n
    attn.o_proj = backend.row(attn.o_proj, group, sp)
    block.post_attention_layernorm = backend.entry_norm(block.post_attention_layernorm, group, sp)
    mlp.gate_up = backend.column(mlp.gate_up, group, sp, parts=(mlp.down_proj.in_features,) * 2)
    mlp.down_proj = backend.row(mlp.down_proj, group, sp)
    if chunks >= 2:  # each chunk's reduction in flight while the next chunks compute (tp_overlap.py)
        apply_batch_chunks(attn, attn.o_proj, chunks, block.input_layernorm, attn.qkv)
        apply_batch_chunks(mlp, mlp.down_proj, chunks, block.post_attention_layernorm, mlp.gate_up)


def apply_tp(model: STARFlow2, topo: Topology, cfg: ParallelConfig) -> STARFlow2:
    """Swap the layers of `model` for tensor-parallel ones over `topo`'s groups (in place; returns
    the model). A no-op when both degrees are 1. On a materialised model each rank keeps its shard
    of the current weights."""
    if cfg.tp != topo.tp or (cfg.flow_tp or cfg.tp) != topo.flow_tp:
        raise ValueError(f"parallel config (tp={cfg.tp}, flow_tp={cfg.flow_tp}) does not match the topology {topo}")
    check_tp(model.cfg, topo.tp, topo.flow_tp, cfg.sequence_parallel)
    if topo.tp == 1:
        return model
    if topo.tp_group is None:
        raise ValueError(f"apply_tp needs process groups: call torch.distributed.init_process_group before "
                         f"building the Topology ({topo})")
    tp_g, sp = topo.tp_group, cfg.sequence_parallel
    flow_g = tp_g if topo.flow_tp == topo.tp else topo.flow_tp_group  # one communicator when they coincide
    backend = get_backend(cfg.backend, cfg.async_tp)
    if cfg.async_tp and sp:
        enable_async_tp(tp_g)  # compiled graphs on NCCL: inductor fuses the SP collectives with their GEMMs
    if cfg.comm_reorder:
        raise_collectives()  # compiled: each collective launched when its input is ready, waited where first used
    if cfg.tp_all_reduce == "symm":
        enable_symm_all_reduce(tp_g)  # on NCCL: critical-path all-reduces by two-shot NVLink peer reads (comm.py)

    if model.embed_tokens is not None:
        model.embed_tokens = VocabParallelEmbedding.from_dense(model.embed_tokens, tp_g)
        model.adapter[0] = ColumnParallelLinear.from_dense(model.adapter[0], tp_g, input_comm="copy")
        model.adapter[2] = RowParallelLinear.from_dense(model.adapter[2], tp_g)
        model.norm = ParallelRMSNorm.from_dense(model.norm, tp_g, "gather" if sp else "copy", sp)
        model.lm_head = ColumnParallelLinear.from_dense(model.lm_head, tp_g)
        model.text_loss = VocabParallelTextLoss(tp_g)
        model.vocab_gather = VocabGather(tp_g)
    if model.flow_embed is not None:
        model.flow_embed = VocabParallelEmbedding.from_dense(model.flow_embed, flow_g)
    if sp:
        model.seq_split = SequenceSplit(tp_g)
        model.flow_norm = ParallelRMSNorm.from_dense(model.flow_norm, tp_g, "gather_replicated", True)
    for unit in model.units.values():
        for layer in unit.vlm_layers:
            parallelize_block(layer, tp_g, sp, backend, cfg.tp_overlap)
        parallelize_block(unit.flow_layer, flow_g, sp, backend, cfg.tp_overlap)
        if sp and unit.w_vlm is not None:  # without SP the skips stay replicated nn.Linear: no collective
            unit.w_vlm = SequenceParallelLinear.from_dense(unit.w_vlm, tp_g)
        if sp and unit.w_d is not None:
            unit.w_d = SequenceParallelLinear.from_dense(unit.w_d, tp_g)  # SP: flow_tp == tp
    for block in model.shallow.blocks:
        for layer in block.layers:
            parallelize_block(layer, flow_g, False, backend)
    model.tie_weights()
    return model


@torch.no_grad()
def init_tp_weights(model: STARFlow2, topo: Topology, seed: int = 0) -> None:
    """Initialise a materialised tensor-parallel model: `model.init_weights()` with a seed per TP
    rank, so that shards are independent draws, then make replicated parameters equal across the TP
    group (broadcast from its first rank) and flow shards equal across the flow group's replicas
    (when flow_tp < tp). Same distribution as a single-process init, not the same numbers."""
    torch.manual_seed(seed + 7919 * topo.tp_rank)
    model.init_weights()
    sync_replicas(model, topo)


@torch.no_grad()
def sync_replicas(module: torch.nn.Module, topo: Topology) -> None:
    """Make `module`'s replicated entries equal TP rank 0's, and flow shards replicated
    tp / flow_tp times equal their first copy (after a per-TP-rank init)."""
    if topo.tp == 1:
        return
    layout, fused = shard_layout(module), parts_layout(module)
    for name, t in module.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        if name not in layout:
            dist.broadcast(t.data, src=topo.tp_ranks[0], group=topo.tp_group)
        elif name in fused and not all(sharded for _, sharded in fused[name]):  # replicated k/v rows
            first = t.data.clone()
            dist.broadcast(first, src=topo.tp_ranks[0], group=topo.tp_group)
            dim, group = layout[name]
            for p in pieces(fused[name], group_size(group), group_rank(group)):
                if not fused[name][p.part][1]:
                    t.data.narrow(0, p.local, p.rows).copy_(first.narrow(0, p.local, p.rows))
        elif layout[name][1] is topo.flow_tp_group and topo.flow_tp < topo.tp:
            every = all_gather(t.data[None], topo.tp_group, 0)  # (tp, ...)
            t.data.copy_(every[topo.flow_tp_rank])


def build_tp_model(cfg: ModelConfig, topo: Topology, pcfg: ParallelConfig, device="cpu", seed: int = 0,
                   state_dict: Optional[dict] = None) -> STARFlow2:
    """The build order in one place: meta build -> apply_tp -> materialise -> init (or load a full
    state dict) -> curriculum stage."""
    with torch.device("meta"):
        model = STARFlow2(cfg)
    apply_tp(model, topo, pcfg)
    model.to_empty(device=device)
    model.tie_weights()
    if state_dict is None:
        init_tp_weights(model, topo, seed)
    else:
        load_full_state_dict(model, state_dict)
    apply_stage(model, cfg.stage)
    return model


def tp_modules(model: nn.Module) -> dict:
    """Names of the swapped-in modules and their class names (for logging and tests)."""
    return {n: type(m).__name__ for n, m in model.named_modules() if hasattr(m, "tp_group")}
