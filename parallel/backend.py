"""The one place that chooses the layer implementation of tensor parallelism: 'local' (our layers on
plain torch.distributed) or 'te' (NVIDIA Transformer Engine `te.Linear` with `tp_group`,
`parallel_mode` and `sequence_parallel`, for its FP8-capable GEMMs).

A backend answers three questions for a transformer block: the norm in front of a parallel region,
a column-parallel linear, a row-parallel linear. Both backends shard weights identically (output
rows for column, input columns for row, contiguous by rank; a fused QKV or gate/up weight part by
part, parallel/fused.py), so checkpoints move between them.
The difference is who communicates on entry to a region: the local backend lets the norm in front of
it do it (`ParallelRMSNorm(entry='copy'|'gather')`); Transformer Engine layers do it
themselves, so under 'te' the norm only keeps its sequence-parallel gradient exact.

Transformer Engine is imported only when backend == 'te'. Everything outside transformer blocks
(embeddings, heads, skips, adapter) always uses the local layers. At TP=1 in one process, 'te'
swaps the blocks' linears for plain `te.Linear` (`apply_te_dense`, also per pipeline stage under a
launcher); `fp8_context` then runs their GEMMs in FP8 (parallel.fp8: 'delayed' = DelayedScaling,
'current' = Float8CurrentScaling). The engines wrap each micro-batch's forward in `fp8_forward(...)(i)`:
its own `fp8_autocast` with the amax-reduction group, and `is_first_microbatch` (TE casts a weight to
FP8 on micro-batch 0 and reuses that copy for the others). `te_layout_problem` names what TE's FP8
GEMMs cannot serve (a local GEMM dimension not divisible by 16), for `check_layout`.
`parallel.fp8_backend='torch'` runs FP8 without TE: `apply_fp8_layers` swaps in megaflow/fp8.py's
GEMMs (plain linears and our tensor-parallel ones alike), which need no context (they are FP8
whenever a gradient is recorded).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional

import torch.nn as nn

from megaflow.model.layers import RMSNorm
from parallel.comm import group_size
from parallel.fused import all_sharded
from parallel.layers import ColumnParallelLinear, ParallelRMSNorm, RowParallelLinear, copy_shards

log = logging.getLogger("megaflow")

BACKENDS = ("local", "te")


def import_te():
    """transformer_engine.pytorch, or one clear error. On a machine without CUDA the import raises
    RuntimeError (not ImportError), so both are caught."""
    try:
        import transformer_engine.pytorch as te
    except (ImportError, RuntimeError, OSError) as e:
        raise RuntimeError(
            "parallel.backend='te' needs NVIDIA Transformer Engine on a CUDA machine "
            f"(importing transformer_engine failed: {type(e).__name__}: {e}). "
            "Install transformer_engine[pytorch] on a GPU machine, or set parallel.backend='local'.") from e
    return te


class LocalBackend:
    """`async_tp` under sequence parallelism: the column-parallel layer gathers its own input and the
    row-parallel one scatters its own output, each overlapped with its GEMM (parallel/async_tp.py);
    otherwise the entry norm gathers. `async_tp` without SP: the column-parallel layer enters the
    region itself ('copy_async': its backward's all-reduce overlaps the weight gradient's GEMM);
    otherwise the entry norm copies."""
    name = "local"

    def __init__(self, async_tp: bool = False):
        self.async_tp = async_tp

    def entry_norm(self, norm: RMSNorm, group, sequence_parallel: bool) -> nn.Module:
        entry = None if self.async_tp else "gather" if sequence_parallel else "copy"
        return ParallelRMSNorm.from_dense(norm, group, entry, sequence_parallel)

    def column(self, lin: nn.Linear, group, sequence_parallel: bool, parts=None) -> nn.Module:
        comm = ("gather" if sequence_parallel else "copy_async") if self.async_tp else "none"
        return ColumnParallelLinear.from_dense(lin, group, input_comm=comm, parts=parts)

    def row(self, lin: nn.Linear, group, sequence_parallel: bool) -> nn.Module:
        return RowParallelLinear.from_dense(lin, group, sequence_parallel=sequence_parallel, async_tp=self.async_tp)

    def kv_input_comm(self, sequence_parallel: bool) -> str:
        if not self.async_tp:
            return "none"  # the entry norm communicated
        return "gather" if sequence_parallel else "copy"


class MicroBatch:
    """Shared by every TE linear a backend made: `first` is passed as `is_first_microbatch` (None: TE
    casts the weight to FP8 at every forward; True: cast and keep the copy; False: reuse the copy,
    valid because weights change only between optimizer steps)."""
    first: Optional[bool] = None


class TEBackend:
    name = "te"

    def __init__(self):
        self.te = import_te()
        te = self.te
        self.micro = MicroBatch()

        class CachedLinear(te.Linear):
            """`te.Linear` reading `is_first_microbatch` from the backend's MicroBatch."""
            micro = None

            def forward(self, x, *args, **kwargs):
                if self.micro is not None and self.micro.first is not None:
                    kwargs.setdefault("is_first_microbatch", self.micro.first)
                return super().forward(x, *args, **kwargs)

        class SeqFirstLinear(CachedLinear):
            """Transformer Engine gathers and scatters sequence-parallel activations along dim 0
            (Megatron's (T, B, D) layout); our activations are (B, T, D)."""

            def forward(self, x, *args, **kwargs):
                return super().forward(x.transpose(0, 1).contiguous(), *args, **kwargs).transpose(0, 1)

        self.linear, self.seq_first_linear = CachedLinear, SeqFirstLinear

    def entry_norm(self, norm: RMSNorm, group, sequence_parallel: bool) -> nn.Module:
        return ParallelRMSNorm.from_dense(norm, group, None, sequence_parallel)

    def _linear(self, lin: nn.Linear, group, sequence_parallel: bool, mode: str, parts=None) -> nn.Module:
        cls = self.seq_first_linear if sequence_parallel else self.linear
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, tp_group=group,
                  tp_size=group_size(group), parallel_mode=mode, sequence_parallel=sequence_parallel,
                  params_dtype=lin.weight.dtype, device=lin.weight.device)
        new.tp_group, new.micro = group, self.micro
        new.tp_shards = {"weight": 0, "bias": 0} if mode == "column" else {"weight": 1}
        if parts is not None:  # a fused projection: each part split on its own (parallel/fused.py)
            new.tp_parts = {"weight": all_sharded(parts), "bias": all_sharded(parts)}
        return copy_shards(new, lin)

    def column(self, lin: nn.Linear, group, sequence_parallel: bool, parts=None) -> nn.Module:
        return self._linear(lin, group, sequence_parallel, "column", parts)

    def row(self, lin: nn.Linear, group, sequence_parallel: bool) -> nn.Module:
        return self._linear(lin, group, sequence_parallel, "row")

    def kv_input_comm(self, sequence_parallel: bool) -> str:
        return "gather" if sequence_parallel else "copy"  # no norm entry under 'te'

    def dense(self, lin: nn.Linear) -> nn.Module:
        """An unsharded `te.Linear` holding `lin`'s weights (TP=1)."""
        new = self.linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          params_dtype=lin.weight.dtype, device=lin.weight.device)
        new.micro = self.micro
        return copy_shards(new, lin)


BLOCK_LINEARS = (("self_attn", ("qkv", "o_proj")), ("mlp", ("gate_up", "down_proj")))


def apply_te_dense(model: nn.Module) -> nn.Module:
    """TP=1: every transformer block's linears (both streams and the shallow flows) become
    `te.Linear` with the same weights and names, so checkpoints stay interchangeable with 'local'
    (Transformer Engine's `_extra_state` entries aside). Needs a materialised model (or pipeline
    stage) on a GPU; blocks still on the meta device (other ranks' stages) are left alone."""
    from megaflow.model.layers import TransformerBlock
    backend = TEBackend()
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        if block.mlp.down_proj.weight.is_meta:
            continue
        for part, names in BLOCK_LINEARS:
            holder = getattr(block, part)
            for name in names:
                setattr(holder, name, backend.dense(getattr(holder, name)))
    return model


def apply_fp8_layers(model: nn.Module, pcfg, device=None, mcfg=None) -> nn.Module:
    """The one place a built model (or this rank's pipeline stage) gets the layers its config asks
    for: at TP=1, `te.Linear` under backend 'te' (`apply_te_dense`; under TP, apply_tp made TE's
    parallel layers already); under fp8_backend 'torch', at any TP, torch's FP8 GEMMs on the block
    linears of both dimensions >= fp8_min_dim (megaflow/fp8.py: nn.Linear become Float8Linear, the
    tensor-parallel layers take its fp8_linear; before compile, so the casts fuse into the blocks'
    graphs; `fp8=delayed`: each with its amax history; the first and last `fp8_bf16_ends` VLM blocks
    of the model `mcfg` describes (default: `model.cfg`) stay bf16). After init or load."""
    if pcfg.backend == "te" and pcfg.tp == 1:
        apply_te_dense(model)
    if pcfg.torch_fp8:
        from megaflow.fp8 import apply_fp8, check_fp8_device
        check_fp8_device(device if device is not None else next(model.parameters()).device)
        ends = vlm_end_blocks(mcfg if mcfg is not None else model.cfg, pcfg.fp8_bf16_ends)
        names = apply_fp8(model, pcfg.fp8_min_dim, fast_accum=pcfg.fp8_fast_accum, split_t=pcfg.fp8_split_transpose,
                          delayed=pcfg.fp8 == "delayed", exclude=ends, split_dy=pcfg.fp8_split_dy,
                          one_read=pcfg.fp8_one_read_operands)
        log.info("FP8 (torch._scaled_mm, %s scaling): %d block linears of both dimensions >= %d%s%s", pcfg.fp8,
                 len(names), pcfg.fp8_min_dim, f", the first and last {pcfg.fp8_bf16_ends} VLM blocks in bf16"
                 if ends else "", "" if names else "; none is that large: set parallel.fp8_min_dim lower or fp8=off")
    return model


def vlm_end_blocks(mcfg, n: int) -> tuple:
    """Name prefixes of the first and the last `n` VLM blocks of a STARFlow2 of config `mcfg` (the
    VLM block k*ratio + j is `units.k.vlm_layers.j`: its name in the model and in every pipeline
    stage); () for n = 0 or a model without a VLM."""
    if n <= 0 or mcfg.vlm is None:
        return ()
    total = mcfg.flow.n_layers * mcfg.flow.ratio
    ends = sorted(set(range(min(n, total))) | set(range(max(total - n, 0), total)))
    return tuple(f"units.{i // mcfg.flow.ratio}.vlm_layers.{i % mcfg.flow.ratio}." for i in ends)


def fp8_context(recipe: str, group=None):
    """Context for a forward: FP8 GEMMs in Transformer Engine layers with the scaling `recipe`
    ('delayed' or 'current'); a no-op for 'off'. `group`: where delayed scaling reduces its amax."""
    if recipe == "off":
        return contextlib.nullcontext()
    return import_te().fp8_autocast(enabled=True, fp8_recipe=_fp8_recipe(recipe), fp8_group=group)


def fp8_forward(recipe: str, modules: list, group=None, micro_batches: int = 1):
    """For the engines: a function of the micro-batch index giving the context of that micro-batch's
    forward: `fp8_context(recipe, group)` (its own autocast, so the schedules may interleave forwards
    and backwards), with TE's FP8 weight copies made on micro-batch 0 and reused on the others
    (with one micro-batch a step there is nothing to reuse: TE casts them without keeping a copy).
    Checkpointed blocks ('selective' or 'full') recompute through TE's own `checkpoint`, which
    restores the forward's FP8 scaling state (torch's would recompute them in bf16).
    `group`: the amax-reduction group (Topology.amax_group: the TP x DP ranks of this pipeline stage,
    which hold the same layers). recipe 'off': no-op contexts."""
    if recipe == "off":
        return lambda i: contextlib.nullcontext()
    from megaflow.model.layers import TransformerBlock
    te = import_te()
    for mod in modules:  # activation checkpointing recomputes inside this forward's FP8 state (megaflow/speed.py)
        for block in mod.modules():
            if isinstance(block, TransformerBlock):
                block.ac_checkpoint = functools.partial(te.checkpoint, use_reentrant=False)
    micros = list({id(m.micro): m.micro for mod in modules for m in mod.modules()
                   if isinstance(getattr(m, "micro", None), MicroBatch)}.values())

    @contextlib.contextmanager
    def forward(i: int):
        for mb in micros:
            mb.first = (i == 0) if micro_batches > 1 else None
        try:
            with fp8_context(recipe, group):
                yield
        finally:  # forwards outside a step (evaluation, recomputation) cast afresh
            for mb in micros:
                mb.first = None
    return forward


def te_layout_problem(mcfg, pcfg) -> Optional[str]:
    """Why Transformer Engine's FP8 GEMMs cannot serve this model under this layout, or None: every
    block linear's local weight (after the TP split, as `apply_tp` makes it: VLM blocks by tp, the
    flow blocks and the shallow flows' blocks by flow_tp) needs both dimensions divisible by 16."""
    if pcfg.fp8 == "off":
        return None
    if pcfg.torch_fp8:  # torch's FP8 GEMMs skip the layers they cannot serve (too small or odd: bf16)
        return None
    import torch
    from megaflow.model.layers import TransformerBlock
    from megaflow.model.starflow import STARFlow2
    with torch.device("meta"):
        model = STARFlow2(mcfg)
    for name, block in model.named_modules():
        if not isinstance(block, TransformerBlock):
            continue
        tp = pcfg.tp if ".vlm_layers." in f".{name}." else (pcfg.flow_tp or pcfg.tp)
        for part, names in BLOCK_LINEARS:
            for lname in names:
                lin = getattr(getattr(block, part), lname)
                col = lname in ("qkv", "gate_up")
                out_f, in_f = lin.out_features // (tp if col else 1), lin.in_features // (1 if col else tp)
                if out_f % 16 or in_f % 16:
                    return (f"parallel.fp8={pcfg.fp8!r}: {name}.{part}.{lname} would be a {out_f} x {in_f} weight "
                            f"on each rank (tp={tp}), and FP8 GEMMs need both dimensions divisible by 16; "
                            "change the model widths or parallel.tp, or set parallel.fp8=off")
    return None


@functools.lru_cache(maxsize=None)
def _fp8_recipe(name: str):
    """One recipe object per name for the whole run (delayed scaling keeps its amax history per layer)."""
    import_te()
    from transformer_engine.common import recipe as te_recipe
    return te_recipe.DelayedScaling() if name == "delayed" else te_recipe.Float8CurrentScaling()


def get_backend(name: str, async_tp: bool = False):
    if name == "local":
        return LocalBackend(async_tp)
    if name == "te":
        return TEBackend()
    raise ValueError(f"parallel.backend={name!r} must be one of {BACKENDS}")
