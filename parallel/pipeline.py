"""Split a STARFlow2 model into pipeline stages: choose the layout, cut the model, fill the stages.

A virtual stage `s` (0 .. pp*virtual_stages-1) lives on pipeline rank `s % pp` as model chunk
`s // pp`. Stage 0 owns the FAE, the shallow flows, the embeddings and the adapter; the last stage
owns the norms, the LM head and the Gaussian head (the losses); every stage owns a contiguous run
of Pretzel units, whose ModuleDict keys ('3', '4', ...) survive the split, so parameter names are
the full model's names and a full state dict loads into any stage.

A stage's module is a *pruned view* of the model: a shallow copy of the top-level STARFlow2 whose
children are the same module objects, with what the stage does not own set to None. So the model
may be built on meta and tensor-parallel layers swapped in before the split; the stage then
materialises and initialises (`init_stages`) or loads (`load_stages`) only its own parameters.
The stage boundary carries the model's state tuple (h_vlm, h_flow, flow_x, flow_aux); every stage
rebuilds the attention context from the batch, which all ranks of a pipeline hold.

Not here: the schedule (schedules.py), the point-to-point transport (pipeline_comm.py), the step
executor (pipeline_step.py), generation (pipeline_generate.py).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.schedules import check_schedule

FIRST_MODULES = ("fae", "shallow", "embed_tokens", "adapter", "flow_embed", "flow_in")
FIRST_PARAMS = ("flow_start",)
LAST_MODULES = ("norm", "lm_head", "flow_norm", "gauss_head")
SHARED_MODULES = ("units", "text_loss", "seq_split", "vocab_gather")  # units are cut; the rest hold no parameters


# ----- cost model and layout ---------------------------------------------------------------------
def _layer_flops(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int, seq_len: int) -> float:
    """Forward FLOPs per token of one Llama-style layer: projections, causal attention, SwiGLU."""
    proj = 2 * dim * head_dim * (2 * n_heads + 2 * n_kv_heads)
    attn = 2 * 2 * n_heads * head_dim * seq_len / 2  # QK^T and AV over on average T/2 keys
    return proj + attn + 3 * 2 * dim * ffn_dim


def stage_costs(cfg, seq_len: int = 2048):
    """Forward FLOPs per token: (one Pretzel unit, extra of the first stage, extra of the last stage).
    A unit is r VLM layers + one flow layer + the two skips. The first stage adds the adapter,
    flow input and the shallow flows (counted at every position, an upper bound; the frozen FAE
    encoder is not counted); the last adds the LM head and the Gaussian head."""
    v, f, D = cfg.vlm, cfg.flow, cfg.fae.latent_dim
    unit = _layer_flops(f.dim, f.n_heads, f.n_heads, f.dim // f.n_heads, f.ffn_dim, seq_len)
    first = 2 * D * f.dim
    last = 2 * f.dim * 2 * D
    if v is not None:
        unit += f.ratio * _layer_flops(v.dim, v.n_heads, v.n_kv_heads, v.hd, v.ffn_dim, seq_len) + 2 * 2 * v.dim * f.dim
        first += 2 * (D * v.dim + v.dim * v.dim)
        last += 2 * v.dim * v.vocab_size
    sd = f.shallow_dim
    shallow_layer = _layer_flops(sd, f.shallow_heads, f.shallow_heads, sd // f.shallow_heads, 4 * sd, cfg.fae.n_tokens)
    first += f.n_shallow * (f.shallow_layers * shallow_layer + 2 * D * sd + 2 * sd * 2 * D)
    return float(unit), float(first), float(last)


def balance_layout(n_units: int, n_stages: int, unit_cost: float, first_cost: float, last_cost: float) -> list:
    """Units per stage, contiguous, at least one each, minimising the most expensive stage
    (exact, by dynamic programming over split points)."""
    INF = float("inf")
    # best[s][i]: smallest max-cost of placing the first i units on the first s stages
    best = [[INF] * (n_units + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_units + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n_units - (n_stages - s) + 1):
            for j in range(s - 1, i):
                cost = (i - j) * unit_cost + (first_cost if s == 1 else 0.0) + (last_cost if s == n_stages else 0.0)
                val = max(best[s - 1][j], cost)
                if val < best[s][i] - 1e-9 * max(val, 1.0):
                    best[s][i], cut[s][i] = val, j
    layout, i = [], n_units
    for s in range(n_stages, 0, -1):
        layout.append(i - cut[s][i])
        i = cut[s][i]
    return layout[::-1]


def parse_layout(text: str, n_units: int, n_stages: int) -> list:
    """'3,5' -> [3, 5], checked against the model's units and the number of stages."""
    try:
        layout = [int(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"parallel.stage_layout={text!r} must be comma-separated unit counts, e.g. '3,5'") from None
    if len(layout) != n_stages:
        raise ValueError(f"parallel.stage_layout={text!r} gives {len(layout)} stages but pp * virtual_stages = "
                         f"{n_stages}; give one unit count per (virtual) stage")
    if min(layout) < 1:
        raise ValueError(f"parallel.stage_layout={text!r}: every stage needs at least one Pretzel unit")
    if sum(layout) != n_units:
        what = "misses units" if sum(layout) < n_units else "repeats or invents units"
        raise ValueError(f"parallel.stage_layout={text!r} covers {sum(layout)} Pretzel units but the model has "
                         f"{n_units} (flow.n_layers); the layout {what}: the counts must add up to {n_units}")
    return layout


def choose_layout(cfg, pp: int, virtual_stages: int = 1, stage_layout: str = "", seq_len: int = 2048) -> list:
    """Units per virtual stage: the manual `stage_layout` if given, else balanced by FLOPs."""
    n_units, n_stages = cfg.flow.n_layers, pp * virtual_stages
    if n_stages > n_units:
        raise ValueError(f"pp * virtual_stages = {pp} * {virtual_stages} = {n_stages} pipeline stages but the model has "
                         f"only {n_units} Pretzel units (flow.n_layers={n_units}); every stage needs at least one "
                         f"unit: lower parallel.pp or parallel.virtual_stages")
    if stage_layout:
        return parse_layout(stage_layout, n_units, n_stages)
    return balance_layout(n_units, n_stages, *stage_costs(cfg, seq_len))


def describe_layout(cfg, layout: list, pp: int, seq_len: int = 2048) -> str:
    unit, first, last = stage_costs(cfg, seq_len)
    lines, start = [], 0
    for s, n in enumerate(layout):
        cost = n * unit + (first if s == 0 else 0.0) + (last if s == len(layout) - 1 else 0.0)
        extra = (" +embed" if s == 0 else "") + (" +heads" if s == len(layout) - 1 else "")
        lines.append(f"  stage {s} (rank {s % pp}, chunk {s // pp}): units {start}..{start + n - 1}{extra}, "
                     f"{cost / 1e6:.2f} MFLOP/token")
        start += n
    return "pipeline layout:\n" + "\n".join(lines)


# ----- stages ----------------------------------------------------------------------------------------
class _DtypeAnchor(nn.Module):
    """Stands in for `flow_in` on stages that do not own it: `STARFlow2.context` and the Decoder read
    `flow_in.weight` for dtype and device only. A non-persistent buffer: no parameter, no state."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", torch.empty(0, dtype=like.dtype, device=like.device), persistent=False)


class Stage:
    """One virtual stage: `module` is the pruned STARFlow2 view it runs."""

    def __init__(self, module: nn.Module, index: int, n_stages: int, pp: int, unit_keys: list):
        self.module, self.index, self.n_stages = module, index, n_stages
        self.chunk, self.unit_keys = index // pp, unit_keys
        self.is_first, self.is_last = index == 0, index == n_stages - 1

    def forward(self, batch: dict, ctx, state: Optional[tuple] = None, noise: Optional[torch.Tensor] = None) -> tuple:
        if self.is_first:
            state = self.module.embed(batch, ctx, noise)
        for unit in self.module.units.values():
            state = unit(state, ctx)
        return state

    def __repr__(self):
        return f"Stage({self.index}/{self.n_stages}, units {self.unit_keys[0]}..{self.unit_keys[-1]})"


def _check_known_children(model: nn.Module) -> None:
    known = set(FIRST_MODULES) | set(LAST_MODULES) | set(SHARED_MODULES)
    unknown = [n for n in model._modules if n not in known] + [n for n in model._parameters if n not in FIRST_PARAMS]
    if unknown:
        raise ValueError(f"split_stages does not know which pipeline stage owns {unknown}; "
                         f"add them to FIRST_MODULES / LAST_MODULES in parallel/pipeline.py")


def stage_view(model: nn.Module, unit_keys: list, first: bool, last: bool) -> nn.Module:
    """A shallow copy of `model` that owns only `unit_keys` (+ the embedding side if `first`, the
    heads if `last`). Children are shared with `model`, not copied."""
    _check_known_children(model)
    view = copy.copy(model)
    view._modules = OrderedDict(model._modules)
    view._parameters = OrderedDict(model._parameters)
    view._buffers = OrderedDict(model._buffers)
    view._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
    view._modules["units"] = nn.ModuleDict({k: model.units[k] for k in unit_keys})
    if not first:
        for name in FIRST_MODULES:
            view._modules[name] = None
        for name in FIRST_PARAMS:
            view._parameters[name] = None
        view._modules["flow_in"] = _DtypeAnchor(model.flow_in.weight)
    if not last:
        for name in LAST_MODULES:
            view._modules[name] = None
    return view


def split_stages(model: nn.Module, pp: int, pp_rank: int, schedule: str = "1f1b", virtual_stages: int = 1,
                 micro_batches: int = 1, stage_layout: str = "", seq_len: int = 2048, verbose: bool = True) -> list:
    """This pipeline rank's stages (one per model chunk, in chunk order). Build on meta and apply
    tensor parallelism before calling this; then `init_stages` or `load_stages`."""
    check_schedule(schedule, pp, virtual_stages, micro_batches)
    layout = choose_layout(model.cfg, pp, virtual_stages, stage_layout, seq_len)
    if verbose and pp_rank == 0:
        print(describe_layout(model.cfg, layout, pp, seq_len), flush=True)
    keys = list(model.units.keys())
    starts = [sum(layout[:s]) for s in range(len(layout))]
    n_stages = len(layout)
    stages = []
    for s in range(pp_rank, n_stages, pp):
        unit_keys = keys[starts[s]:starts[s] + layout[s]]
        view = stage_view(model, unit_keys, first=s == 0, last=s == n_stages - 1)
        stages.append(Stage(view, s, n_stages, pp, unit_keys))
    return stages


def stage_parameters(stages: list) -> list:
    """Trainable parameters of all local stages, each once."""
    seen, out = set(), []
    for st in stages:
        for p in st.module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


# ----- materialise ------------------------------------------------------------------------------------
def load_stages(stages: list, state_dict: dict, device="cpu", loader=None) -> None:
    """Materialise each stage on `device` and copy its own entries of a FULL model state dict
    (names match the unsplit model); a missing entry is an error. `loader(module, state_dict)`
    replaces the plain copy, e.g. tensor parallelism's
    `lambda m, sd: checkpoint_tp.load_full_state_dict(m, sd, strict=False)`, which slices shards."""
    for st in stages:
        st.module.to_empty(device=device)
        st.module.tie_weights()  # to_empty unties; re-tie where one stage holds both ends
        own = st.module.state_dict()
        missing = [k for k in own if k not in state_dict and not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"stage {st.index}: the state dict lacks {missing[:5]} (and {max(len(missing) - 5, 0)} more)")
        if loader is not None:
            loader(st.module, state_dict)
        else:
            st.module.load_state_dict({k: state_dict[k] for k in own}, strict=True)


@torch.no_grad()
def init_stages(model: nn.Module, stages: list, device, seed: int = 0) -> None:
    """Materialise the stages of a meta-built `model` on `device` and initialise them with the
    model's own `init_weights` (run on the full model: the parts no local stage owns stay on meta,
    where initialisation is a no-op). Weights differ from an unsplit init with the same seed
    (the random stream is consumed differently); tied embeddings are synced by
    `TiedEmbeddings.broadcast`."""
    heads = {}
    for st in stages:
        st.module.to_empty(device=device)
        for name in FIRST_PARAMS:
            if st.module._parameters.get(name) is not None:
                model._parameters[name] = st.module._parameters[name]
        if st.is_last and st.module.lm_head is not None:
            heads[st.module.lm_head] = st.module.lm_head.weight
    torch.manual_seed(seed)
    model.init_weights()
    for lm_head, weight in heads.items():  # init_weights re-ties the head to a (maybe meta) embedding
        if lm_head.weight.is_meta:
            lm_head.weight = weight
            nn.init.normal_(lm_head.weight, std=0.02)


class TiedEmbeddings:
    """vlm.tie_embeddings with pp > 1: the token embedding (first stage) and the LM head (last stage)
    are one matrix held twice, like Megatron's embedding group. After backward, `all_reduce_grads`
    sums the two gradients; `broadcast` copies the first stage's weight to the last after init.
    Every rank must construct it (it creates one group per pipeline)."""

    def __init__(self, stages: list, topo):
        self.group, self.weight = None, None
        cfg = stages[0].module.cfg
        if cfg.vlm is None or not cfg.vlm.tie_embeddings or topo.pp == 1:
            return
        for d in range(topo.dp):
            for t in range(topo.tp):
                ends = [p * topo.tp * topo.dp + d * topo.tp + t for p in (0, topo.pp - 1)]
                g = dist.new_group(ends)
                if topo.rank in ends:
                    self.group, self.src = g, ends[0]
        for st in stages:
            if st.is_first:
                self.weight = st.module.embed_tokens.weight
            elif st.is_last:
                self.weight = st.module.lm_head.weight

    @torch.no_grad()
    def broadcast(self) -> None:
        if self.group is not None:
            dist.broadcast(self.weight.data, src=self.src, group=self.group)

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        if self.group is not None and self.weight.requires_grad:
            if self.weight.grad is None:
                self.weight.grad = torch.zeros_like(self.weight)
            dist.all_reduce(self.weight.grad, group=self.group)
