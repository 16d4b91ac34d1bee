"""FP8 linears on torch's own `torch._scaled_mm`, made to be compiled with the rest of a block (the
route torchtitan takes through torchao's float8 training), with no Transformer Engine.

A `Float8Linear` is an `nn.Linear` (same parameters, same state-dict names: checkpoints move
freely between FP8 and bf16 runs) whose training forward runs its three GEMMs in FP8:
    forward   y  = x W^T     x, W in e4m3
    backward  dx = dy W      dy in e5m2 (wider range, for gradients), W in e4m3
              dW = dy^T x
Scaling is tensor-wise. Current scaling (parallel.fp8=current): each operand is scaled by (largest
finite FP8) / amax(operand) at the moment it is cast, so each cast waits for a reduction over its
tensor. Delayed scaling (parallel.fp8=delayed, Transformer Engine's default recipe): each layer keeps
an amax history of x, W and dy (`add_history`: fp32 buffers updated in place inside the compiled
graphs, no host read) and scales by its maxima, so the cast needs no pass before it and the amax it
records is read by the same graph; a layer's first call scales by the current amaxes and fills the
history (one more compiled graph), and checkpoints carry the histories (`fp8_state`; under
activation checkpointing the recomputed forward scales by a history that already holds its own
amax: within FP8 rounding of the first forward). Under torch.compile the amax reductions and casts
are plain elementwise/reduction ops that inductor fuses into the neighbouring norm / SiLU / residual
kernels, and only the GEMMs stay separate (on the ~3B config at 16 x 1024 tokens: 1.40x BF16 end to
end, 1.34x with the flow blocks left in bf16; TE's eager FP8 layers gave 1.02x at 8 x 1024; delayed
scaling was no faster than current there, round 4). What is left of the FP8 overhead is
mostly inductor's casts that also write the transposed FP8 copies the backward's GEMMs need
(docs/benchmarks.md "FP8 on torch._scaled_mm, round 2").
The forward saves the FP8 copies of x and W (half the bytes of bf16) for the backward (compiled,
the partitioner may instead recompute x's cast from the norm before it: cheaper than storing it).
With `split_t` (parallel.fp8_split_transpose) it makes and saves x's transposed copy itself, by the
opaque `fp8_transpose`, so that copy is neither fused into the norm + cast kernel (slow one-byte
transposed stores) nor recomputed: the ~3B step 398 -> 390 ms, 1.37x BF16 synchronised with the flow
in bf16 (round 3 of that section). With `one_read` (parallel.fp8_one_read) the operands it names are
cast in both layouts by one Triton kernel from one read (megaflow/fp8_kernels.fp8_cast_t, ~3.6 TB/s on
the H200 against inductor's ~2.6): W (its transposed copy for dx made in the forward and saved), dy,
and x ('xo': of the output projections only): the ~3B step 391 -> 381 ms, 1.39x synchronised and
1.36-1.37x back to back (round 5).

FP8 runs only when a gradient is being recorded (training); evaluation and generation run the bf16
forward of the same weights. Rows of a call not divisible by 16 (what FP8 GEMMs need) fall back to
bf16 for that call. `apply_fp8` makes the swap from outside, after the model is built, and only on
linears whose both dimensions are >= `min_dim` (docs/benchmarks.md "FP8 on torch._scaled_mm" has the
measurements behind the default, 2048; its round 2: 4096 keeps the ~3B config's bits/dim within 1%).
Under tensor parallelism our column/row-parallel layers take `fp8_linear` as their GEMM. Needs a GPU
with FP8 GEMMs (compute capability >= 8.9: H100, H200, L40S, RTX 4090) for speed; torch also runs
`_scaled_mm` on the CPU (slowly), which the tests use to check the math (in fp32: under CPU autocast
the CPU `_scaled_mm` itself rounds differently in eager and compiled code).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.fp8_kernels import E4M3, E5M2, fp8_cast, fp8_cast_t

AMAX_HISTORY = 16  # delayed scaling: calls whose amaxes scale the next one (torchao's default; TE's is 1024)
HISTORY_BUFFER = "fp8_amax_history"


def fp8_scale(t: torch.Tensor, dtype: torch.dtype, amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What t is multiplied by before its cast to `dtype` (a 0-d fp32 tensor: largest finite FP8 / amax).
    `amax`: what to scale by (delayed scaling: the largest amax of the earlier calls; values beyond it
    saturate at the largest FP8 value; 0: scale 1); None: t's own amax (current scaling)."""
    fmax = torch.finfo(dtype).max
    if amax is None:
        amax = t.detach().abs().amax().float().clamp(min=1e-12)  # an all-zero tensor stays zero, not NaN
    else:  # a history of zeros only (a zero-initialised layer's first gradients): scale 1, as TE starts
        amax = torch.where(amax > 0, amax, fmax)
    return fmax / amax


def to_fp8(t: torch.Tensor, dtype: torch.dtype, amax: Optional[torch.Tensor] = None) -> tuple:
    """(t scaled into `dtype`'s range and cast, row-major; the inverse scale, a 0-d fp32 tensor);
    `amax` as in `fp8_scale`."""
    scale = fp8_scale(t, dtype, amax)
    return fp8_cast(t, scale, dtype).contiguous(), scale.reciprocal()


def to_fp8_t(t: torch.Tensor, dtype: torch.dtype, amax: Optional[torch.Tensor] = None) -> tuple:
    """(q, q^T, inverse scale): `to_fp8`'s cast of t (M, K) in both layouts, (M, K) and (K, M), from one
    read of t (megaflow/fp8_kernels.fp8_cast_t: one Triton kernel on a GPU)."""
    scale = fp8_scale(t, dtype, amax)
    q, qt = fp8_cast_t(t, scale, dtype == E5M2)
    return q, qt, scale.reciprocal()


def record_amax(row: torch.Tensor, t: torch.Tensor) -> None:
    """Delayed scaling's history, in place (no host read; a few-element op in the same graph as the
    cast, which inductor may fuse with the cast's own read of t): `row` (H,) drops its oldest amax and
    ends with t's."""
    row.copy_(torch.cat([row[1:], t.detach().abs().amax().float()[None]]))


@torch.library.custom_op("megaflow::fp8_transpose", mutates_args=())
def fp8_transpose(q: torch.Tensor) -> torch.Tensor:
    """q^T, contiguous (q: (M, K) FP8 -> (K, M)): the token-major copy of an FP8 activation that the
    backward's dW = dy^T x needs (Hopper's FP8 GEMMs read both operands K-major). An opaque op, so
    that inside a compiled block (a) inductor cannot fuse this one-byte transposed store into the
    kernel that produces q (the RMSNorm + cast kernel, whose row-wise tiling made that store run at
    ~1/10 of the bandwidth: docs/benchmarks.md "FP8 on torch._scaled_mm, round 2"), and (b) the
    partitioner saves its output (1 byte an element) instead of recomputing norm, cast and transpose
    in the backward. On a GPU it runs its own small compiled transpose kernel; on the CPU ATen's."""
    if q.device.type != "cuda":
        return q.t().contiguous()
    return _compiled_transpose()(q)


@fp8_transpose.register_fake
def _(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[1], q.shape[0])  # (K, M)


@functools.cache
def _compiled_transpose() -> Callable:
    # one compiled kernel per shape (a handful: the block widths); eager ATen's one-byte transpose
    # is ~4x slower than inductor's tiled one (fp8_cast_probe.py)
    return torch.compile(lambda q: q.t().contiguous(), dynamic=False)


class _Fp8Matmul(torch.autograd.Function):
    """y = x W^T with FP8 operands in all three GEMMs (x: (M, K), W: (N, K) -> y: (M, N)).
    `split_t`: x's transposed FP8 copy made in the forward by `fp8_transpose` and saved (else: by
    the backward, or wherever the compiler puts it, fused with x's cast).
    `hist`: delayed scaling's (3, H) amax history of x, W and dy (updated in place: the forward
    records x's and W's, the backward dy's); `use_hist`: scale by its maxima (else by the current
    amaxes, as on the first call, which fills it). `split_dy`: dy's transposed FP8 copy for dW made
    by `fp8_transpose` too (else fused by inductor into dy's cast).
    `one_read`: the operands among 'x', 'w', 'dy' cast in both layouts from one read
    (megaflow/fp8_kernels.fp8_cast_t; the same bytes as the other paths): W's transposed copy for
    dx = dy W then comes from the forward (saved instead of the row-major one), x's and dy's for dW
    replace `split_t`'s / `split_dy`'s."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, fast_accum: bool,
                split_t: bool, hist: Optional[torch.Tensor] = None, use_hist: bool = False,
                split_dy: bool = False, one_read: tuple = ()) -> torch.Tensor:
        prev = hist[:2].amax(dim=1) if use_hist else (None, None)  # (2,): read before this call records
        if "x" in one_read:
            xq, xq_t, x_inv = to_fp8_t(x, E4M3, prev[0])  # (M, K), (K, M)
        else:
            xq, x_inv = to_fp8(x, E4M3, prev[0])  # (M, K)
            xq_t = fp8_transpose(xq) if split_t else None
        if "w" in one_read:
            wq, wq_t, w_inv = to_fp8_t(w, E4M3, prev[1])  # (N, K), (K, N)
        else:
            wq, w_inv = to_fp8(w, E4M3, prev[1])  # (N, K)
            wq_t = None
        if hist is not None:
            record_amax(hist[0], x)
            record_amax(hist[1], w)
        # the backward's dW GEMM reads x column-major: its (M, K) view of a row-major (K, M) copy; its dx
        # GEMM reads W column-major likewise
        x_col = xq_t.t() if xq_t is not None else xq
        w_col = wq_t.t() if wq_t is not None else wq
        ctx.save_for_backward(x_col, w_col, x_inv, w_inv)
        ctx.one_read_dy = "dy" in one_read
        ctx.dtypes = (x.dtype, w.dtype)
        # hist: not saved_tensors (the next micro-batch's forward updates it before this backward); dy's
        # row is read when the backward runs: every backward but the first call's finds it filled, also
        # when several forwards run before their backwards (pipelines)
        ctx.hist, ctx.use_hist, ctx.split_dy = hist, use_hist, split_dy
        # _scaled_mm takes a row-major first and a column-major second operand: W^T of a row-major W is
        # one (a view, no copy).
        # fast_accum: the forward GEMM accumulates without cuBLAS's periodic promotion to fp32 (what
        # Transformer Engine and torchao do for the forward; the two gradient GEMMs keep the promotion;
        # off by default: no gain measured on the H200)
        return torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)  # (M, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_col, w_col, x_inv, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dy_amax = ctx.hist[2].amax() if ctx.use_hist else None
        if ctx.one_read_dy:
            dyq, dy_t, dy_inv = to_fp8_t(dy, E5M2, dy_amax)  # (M, N), (N, M)
        else:
            dyq, dy_inv = to_fp8(dy, E5M2, dy_amax)  # (M, N)
            dy_t = fp8_transpose(dyq) if ctx.split_dy else dyq.t().contiguous()  # (N, M)
        if ctx.hist is not None:
            record_amax(ctx.hist[2], dy)
        # x_col / w_col: (M, K) / (N, K); no copy when column-major (split or one-read), else a transposed copy
        dx = torch._scaled_mm(dyq, w_col.t().contiguous().t(), scale_a=dy_inv, scale_b=w_inv,
                              out_dtype=x_dtype)  # (M, N) @ (N, K) -> (M, K)
        dw = torch._scaled_mm(dy_t, x_col.t().contiguous().t(), scale_a=dy_inv, scale_b=x_inv,
                              out_dtype=w_dtype)  # (N, M) @ (M, K) -> (N, K)
        return dx, dw, None, None, None, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               fast_accum: bool = False, split_t: bool = False, state: Optional[nn.Module] = None,
               split_dy: bool = False, one_read: tuple = ()) -> torch.Tensor:
    """F.linear(x, weight, bias) with its three GEMMs in FP8 while a gradient is recorded (x: (..., K),
    weight: (N, K) -> (..., N)); otherwise, or for a row count not divisible by 16, F.linear itself.
    Also the GEMM of the tensor-parallel layers under FP8 (parallel/backend.apply_fp8_layers): each
    rank scales its own shard by its own amax, so no amax crosses ranks.
    `state`: the layer; under delayed scaling it holds the amax history (`add_history`): its first
    FP8 call scales by the current amaxes and fills the history, later calls scale by it; its
    `fp8_on` False (`set_fp8_on`): the bf16 GEMM. `one_read`: _Fp8Matmul's."""
    rows = x.numel() // x.shape[-1]
    if not torch.is_grad_enabled() or rows % 16 or not getattr(state, "fp8_on", True):
        return F.linear(x, weight, bias)
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    hist = getattr(state, HISTORY_BUFFER, None)
    use_hist = hist is not None and state.fp8_calibrated  # a host flag: one more graph, no host read a step
    y = _Fp8Matmul.apply(x.reshape(rows, x.shape[-1]), weight, out_dtype, fast_accum, split_t,
                         hist, use_hist, split_dy, one_read)  # (M, N)
    if hist is not None and not use_hist:
        state.fp8_calibrated = True
    y = y.view(*x.shape[:-1], weight.shape[0])  # (..., N)
    return y if bias is None else y + bias.to(y.dtype)


def add_history(mod: nn.Module, length: int = AMAX_HISTORY) -> None:
    """Delayed scaling for one FP8 layer: a (3, length) fp32 amax history of x, W and dy (maxima
    over the last `length` calls scale the next call: Transformer Engine's DelayedScaling recipe with
    its 'max' rule), a non-persistent buffer (the model's state dict stays the nn.Linear's; `fp8_state`
    and `load_fp8_state` carry it through checkpoints), and its not-yet-filled flag."""
    mod.register_buffer(HISTORY_BUFFER, torch.zeros(3, length, device=mod.weight.device), persistent=False)
    mod.fp8_calibrated = False


def fp8_state(model: nn.Module) -> dict:
    """{layer name: its amax history} of every delayed-scaling FP8 layer (empty when none): what a
    checkpoint keeps so that a resumed run scales as the uninterrupted one would."""
    return {name: getattr(m, HISTORY_BUFFER).detach().cpu().clone() for name, m in model.named_modules()
            if getattr(m, HISTORY_BUFFER, None) is not None and m.fp8_calibrated}


def load_fp8_state(model: nn.Module, state: dict) -> int:
    """Puts `fp8_state`'s histories back (layers missing from it start afresh: their first call fills
    theirs); returns how many were restored."""
    n = 0
    for name, m in model.named_modules():
        if name in state and getattr(m, HISTORY_BUFFER, None) is not None:
            getattr(m, HISTORY_BUFFER).copy_(state[name])
            m.fp8_calibrated, n = True, n + 1
    return n


def set_fp8_on(model: nn.Module, on: bool) -> None:
    """FP8 GEMMs of every FP8 layer of `model` on or off (off: the layer's bf16 GEMM; parallel.fp8_start_step).
    A host flag the compiled blocks guard on: the first call after a switch compiles them again."""
    for m in model.modules():
        if isinstance(m, Float8Linear) or isinstance(getattr(m, "linear", None), functools.partial):
            m.fp8_on = on


class Float8Linear(nn.Linear):
    """nn.Linear whose training forward runs in FP8 (module docstring); made by `to_float8`.
    `fast_accum`: the forward GEMM's accumulation; `split_t`: where x's transposed copy is made;
    with `add_history`, delayed scaling (fp8_linear)."""
    fast_accum = False
    split_t = False
    split_dy = False
    one_read = ()
    fp8_calibrated = False
    fp8_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.fast_accum, self.split_t, self, self.split_dy,
                          self.one_read)


def fp8_capable(lin: nn.Module, min_dim: int) -> bool:
    """The size rule: both of the layer's dimensions >= `min_dim` (the whole layer's, also when it is a
    tensor-parallel shard, so the same layers run in FP8 in every layout) and both of its weight's
    (this rank's shard) divisible by 16 (FP8 GEMMs need that)."""
    n, k = lin.out_features, lin.in_features
    return min(n, k) >= min_dim and all(d % 16 == 0 for d in lin.weight.shape)


def to_float8(lin: nn.Linear) -> Float8Linear:
    """The same module object, now a Float8Linear: parameters, hooks and names untouched (works on
    meta-device modules too, so it may come before or after materialisation)."""
    if type(lin) is not nn.Linear:
        raise TypeError(f"to_float8 takes a plain nn.Linear, not {type(lin).__name__} (tensor-parallel layers "
                        "take fp8_linear as their `linear`: apply_fp8)")
    lin.__class__ = Float8Linear
    return lin


OUT_PROJECTIONS = ("o_proj", "down_proj")  # block linears whose input no norm makes: one_read 'xo'


def layer_one_read(name: str, one_read: tuple) -> tuple:
    """The operands layer `name` casts by one read: `one_read`'s, its 'xo' ('x' for the output
    projections only: their inputs, attention's and SwiGLU's outputs, are bf16 tensors already, whereas
    the other linears' x comes out of the norm + cast kernel without a bf16 copy) resolved."""
    ops = tuple(o for o in one_read if o != "xo")
    if "xo" in one_read and "x" not in ops and name.rsplit(".", 1)[-1] in OUT_PROJECTIONS:
        ops += ("x",)
    return ops


def _gemm_hook(mod: nn.Module) -> bool:
    """Whether `mod` runs its GEMM through a `linear` attribute that is F.linear until FP8 replaces it
    (parallel/layers.py's ColumnParallelLinear and RowParallelLinear)."""
    return getattr(type(mod), "linear", None) is F.linear and hasattr(mod, "in_features")


def apply_fp8(model: nn.Module, min_dim: int = 2048, where: Optional[Callable[[str, nn.Module], bool]] = None,
              fast_accum: bool = False, split_t: bool = False, delayed: bool = False, exclude: tuple = (),
              split_dy: bool = False, one_read: tuple = ()) -> list:
    """Every plain nn.Linear of `model` that passes the size rule (and `where(name, module)`, by
    default: inside a transformer block, so embeddings and heads stay bf16) becomes a Float8Linear;
    every tensor-parallel layer with a GEMM hook that passes them runs `fp8_linear` as its GEMM.
    `delayed`: each gets an amax history (`add_history`: delayed scaling); `exclude`: name prefixes
    that stay bf16 (parallel.fp8_bf16_ends); `one_read`: the operands ('x', 'xo', 'w', 'dy':
    `layer_one_read`) cast in both layouts by one kernel (parallel.fp8_one_read). Returns the names
    swapped. Call before regional torch.compile, so the graphs include the casts."""
    from megaflow.model.layers import TransformerBlock
    if where is None:
        inside = {id(m) for b in model.modules() if isinstance(b, TransformerBlock) for m in b.modules()}
        where = lambda name, mod: id(mod) in inside  # noqa: E731
    names = []
    for name, mod in model.named_modules():
        plain = type(mod) is nn.Linear
        if not (plain or _gemm_hook(mod)) or not fp8_capable(mod, min_dim) or not where(name, mod) \
                or (exclude and name.startswith(exclude)):
            continue
        ops = layer_one_read(name, tuple(one_read))
        if delayed:
            add_history(mod)
        if plain:
            lin = to_float8(mod)
            lin.fast_accum, lin.split_t, lin.split_dy, lin.one_read = fast_accum, split_t, split_dy, ops
        else:
            mod.linear = functools.partial(fp8_linear, fast_accum=fast_accum, split_t=split_t, state=mod,
                                           split_dy=split_dy, one_read=ops)
        names.append(name)
    return names


def check_fp8_device(device: torch.device) -> None:
    """One clear error where FP8 training cannot pay: not a CUDA GPU, or one below compute
    capability 8.9 (the layers themselves also run on the CPU, slowly: the tests use that)."""
    if device.type != "cuda":
        raise ValueError(f"parallel.fp8_backend='torch' runs FP8 GEMMs on a CUDA GPU (H100/H200, L40S), and this "
                         f"run is on {device.type}; set parallel.fp8=off")
    if torch.cuda.get_device_capability(device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(f"parallel.fp8_backend='torch' needs FP8 GEMMs (compute capability >= 8.9: H100/H200, "
                         f"L40S), and {torch.cuda.get_device_name(device)} is {cap}; set parallel.fp8=off")
