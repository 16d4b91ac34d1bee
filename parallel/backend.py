"""The one place that chooses the layer implementation of tensor parallelism: 'local' (our layers on
plain torch.distributed) or 'te' (NVIDIA Transformer Engine `te.Linear` with `tp_group`,
`parallel_mode` and `sequence_parallel`, for its FP8-capable GEMMs).

A backend answers three questions for a transformer block: the norm in front of a parallel region,
a column-parallel linear, a row-parallel linear. Both backends shard weights identically (output
rows for column, input columns for row, contiguous by rank), so checkpoints move between them.
The difference is who communicates on entry to a region: the local backend lets the norm do it once
for q, k and v together (`ParallelRMSNorm(entry='copy'|'gather')`); Transformer Engine layers do it
themselves, so under 'te' the norm only keeps its sequence-parallel gradient exact.

Transformer Engine is imported only when backend == 'te'. Everything outside transformer blocks
(embeddings, heads, skips, adapter) always uses the local layers. Proving 'te' on GPUs is a later
issue; here it is wired.
"""
from __future__ import annotations

import torch.nn as nn

from megaflow.model.layers import RMSNorm
from parallel.comm import group_size
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

    def column(self, lin: nn.Linear, group, sequence_parallel: bool) -> nn.Module:
        return ColumnParallelLinear.from_dense(lin, group, input_comm="none")

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

    def _linear(self, lin: nn.Linear, group, sequence_parallel: bool, mode: str) -> nn.Module:
        cls = self.seq_first_linear if sequence_parallel else self.te.Linear
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, tp_group=group,
                  tp_size=group_size(group), parallel_mode=mode, sequence_parallel=sequence_parallel,
                  params_dtype=lin.weight.dtype, device=lin.weight.device)
        new.tp_group = group
        new.tp_shards = {"weight": 0, "bias": 0} if mode == "column" else {"weight": 1}
        return copy_shards(new, lin)

    def column(self, lin: nn.Linear, group, sequence_parallel: bool) -> nn.Module:
        return self._linear(lin, group, sequence_parallel, "column")

    def row(self, lin: nn.Linear, group, sequence_parallel: bool) -> nn.Module:
        return self._linear(lin, group, sequence_parallel, "row")

    def kv_input_comm(self, sequence_parallel: bool) -> str:
        return "gather" if sequence_parallel else "copy"  # no norm entry under 'te'


def get_backend(name: str):
    if name == "local":
        return LocalBackend()
    if name == "te":
        return TEBackend()
    raise ValueError(f"parallel.backend={name!r} must be one of {BACKENDS}")
