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
swaps the blocks' linears for plain `te.Linear` (`apply_te_dense`); `fp8_context` then runs their
GEMMs in FP8 (parallel.fp8: 'delayed' = DelayedScaling, 'current' = Float8CurrentScaling).
"""
from __future__ import annotations

import contextlib
import functools

import torch.nn as nn

from megaflow.model.layers import RMSNorm
from parallel.comm import group_size
from parallel.fused import all_sharded
from parallel.layers import ColumnParallelLinear, ParallelRMSNorm, RowParallelLinear, copy_shards

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
    name = "local"

    def entry_norm(self, norm: RMSNorm, group, sequence_parallel: bool) -> nn.Module:
        return ParallelRMSNorm.from_dense(norm, group, "gather" if sequence_parallel else "copy", sequence_parallel)

    def column(self, lin: nn.Linear, group, sequence_parallel: bool, parts=None) -> nn.Module:
        return ColumnParallelLinear.from_dense(lin, group, input_comm="none", parts=parts)

    def row(self, lin: nn.Linear, group, sequence_parallel: bool) -> nn.Module:
        return RowParallelLinear.from_dense(lin, group, sequence_parallel=sequence_parallel)

    def kv_input_comm(self, sequence_parallel: bool) -> str:
        return "none"  # the entry norm already communicated


class TEBackend:
    name = "te"

    def __init__(self):
        self.te = import_te()
        te = self.te

        class SeqFirstLinear(te.Linear):
            """Transformer Engine gathers and scatters sequence-parallel activations along dim 0
            (Megatron's (T, B, D) layout); our activations are (B, T, D)."""

            def forward(self, x, *args, **kwargs):
                return super().forward(x.transpose(0, 1).contiguous(), *args, **kwargs).transpose(0, 1)

        self.seq_first_linear = SeqFirstLinear

    def entry_norm(self, norm: RMSNorm, group, sequence_parallel: bool) -> nn.Module:
        return ParallelRMSNorm.from_dense(norm, group, None, sequence_parallel)

    def _linear(self, lin: nn.Linear, group, sequence_parallel: bool, mode: str, parts=None) -> nn.Module:
        cls = self.seq_first_linear if sequence_parallel else self.te.Linear
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, tp_group=group,
                  tp_size=group_size(group), parallel_mode=mode, sequence_parallel=sequence_parallel,
                  params_dtype=lin.weight.dtype, device=lin.weight.device)
        new.tp_group = group
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
        new = self.te.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                             params_dtype=lin.weight.dtype, device=lin.weight.device)
        return copy_shards(new, lin)


BLOCK_LINEARS = (("self_attn", ("qkv", "o_proj")), ("mlp", ("gate_up", "down_proj")))


def apply_te_dense(model: nn.Module) -> nn.Module:
    """TP=1: every transformer block's linears (both streams and the shallow flows) become
    `te.Linear` with the same weights and names, so checkpoints stay interchangeable with 'local'
    (Transformer Engine's `_extra_state` entries aside). Needs a materialised model on a GPU."""
    from megaflow.model.layers import TransformerBlock
    backend = TEBackend()
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        for part, names in BLOCK_LINEARS:
            holder = getattr(block, part)
            for name in names:
                setattr(holder, name, backend.dense(getattr(holder, name)))
    return model


def fp8_context(recipe: str, group=None):
    """Context for a forward: FP8 GEMMs in Transformer Engine layers with the scaling `recipe`
    ('delayed' or 'current'); a no-op for 'off'. `group`: where delayed scaling reduces its amax."""
    if recipe == "off":
        return contextlib.nullcontext()
    return import_te().fp8_autocast(enabled=True, fp8_recipe=_fp8_recipe(recipe), fp8_group=group)


@functools.lru_cache(maxsize=None)
def _fp8_recipe(name: str):
    """One recipe object per name for the whole run (delayed scaling keeps its amax history per layer)."""
    import_te()
    from transformer_engine.common import recipe as te_recipe
    return te_recipe.DelayedScaling() if name == "delayed" else te_recipe.Float8CurrentScaling()


def get_backend(name: str):
    if name == "local":
        return LocalBackend()
    if name == "te":
        return TEBackend()
    raise ValueError(f"parallel.backend={name!r} must be one of {BACKENDS}")
