"""Optimizer and learning-rate schedule: AdamW (fused where the device supports it) with decay only
on matrices, and a warm-up + cosine schedule that is a pure function of the step, so it is the one
source of truth for every engine (plain, pipelined, DeepSpeed) and resumes without state."""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import torch

from megaflow.model.layers import fuse_legacy, legacy_parts


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Trainable parameters split into decayed (matrices) and not decayed (norms, biases,
    embeddings, the flow start token).

    Decay follows a parameter's role, not the name one process happens to see: an LM head tied to
    the token embedding is the embedding (no decay), also on a pipeline's last stage, where the tied
    copy is a separate tensor named `lm_head.weight` (parallel/pipeline.py TiedEmbeddings). Any
    wrapper (DeepSpeed's, a ModuleList of stages) is fine: roles come from the STARFlow2 (views) inside."""
    tied_heads = {id(m.lm_head.weight) for m in model.modules()
                  if getattr(m, "lm_head", None) is not None and _ties_embeddings(m)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "embed" in name or id(p) in tied_heads:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def group_names(model: torch.nn.Module, groups: list) -> list:
    """[[parameter name, ...] per group] of `groups` (param_groups' output) of `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


def fuse_legacy_moments(by_name: dict) -> dict:
    """{name: {moment: tensor}} (AdamW state by parameter name) of a checkpoint written before the
    fused projections -> the fused model's names (q/k/v moments concatenated like the weights)."""
    moments: dict = {}
    for name, entry in by_name.items():
        for k, v in entry.items():
            moments.setdefault(k, {})[name] = v
    out: dict = {}
    for k, named in moments.items():
        for name, v in fuse_legacy(named).items():
            out.setdefault(name, {})[k] = v
    return out


def fuse_legacy_optimizer(state: dict, names: list) -> dict:
    """A torch optimizer state_dict (optim.pt, entries numbered) saved before the fused projections
    -> one for this model, whose parameters in optimizer order are `names` (`group_names`). The old
    file numbers q, k, v (gate, up) separately where this model has one fused parameter; their
    moments are concatenated. A state already in this layout (or in no layout we know: torch's own
    load then says what differs) is returned as it is."""
    sizes = [len(g["params"]) for g in state["param_groups"]]
    old = [[o for n in group for o in (legacy_parts(n) or (n,))] for group in names]
    if sizes == [len(g) for g in names] or sizes != [len(g) for g in old]:
        return state
    by_name = {n: state["state"][i] for g, ns in zip(state["param_groups"], old)
               for i, n in zip(g["params"], ns) if i in state["state"]}
    steps = {n: e["step"] for n, e in by_name.items() if "step" in e}
    fused = fuse_legacy_moments({n: {k: v for k, v in e.items() if k != "step"} for n, e in by_name.items()})
    new_state, new_groups, i = {}, [], 0
    for g, ns in zip(state["param_groups"], names):
        ids = []
        for n in ns:
            first = (legacy_parts(n) or (n,))[0]
            if n in fused and first in steps:
                new_state[i] = {"step": steps[first], **fused[n]}
            ids.append(i)
            i += 1
        new_groups.append({**g, "params": ids})
    return {"state": new_state, "param_groups": new_groups}


def _ties_embeddings(module) -> bool:
    vlm = getattr(getattr(module, "cfg", None), "vlm", None)
    return bool(vlm is not None and getattr(vlm, "tie_embeddings", False))


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    groups = param_groups(model, tcfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters in this curriculum stage; check model.stage")
    device = next(p for g in groups for p in g["params"]).device
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    # The fused kernel is exact AdamW; on CPU the foreach path is the tested one.
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def weak_hook(owner, fn: Callable) -> Callable:
    """`fn(owner, tensor)` as a tensor hook that holds `owner` weakly. A hook that held it would keep it alive for
    good, with every tensor it holds: Python's garbage collector does not look inside a tensor's hooks, so the
    cycle tensor -> hook -> owner -> tensor is never freed (a training engine built after another one found
    the first one's weights, gradients and optimizer state still on the GPU)."""
    ref = weakref.ref(owner)

    def hook(tensor: torch.Tensor) -> None:
        alive = ref()
        if alive is not None:
            fn(alive, tensor)
    return hook


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----- mixed precision: bf16 model parameters, fp32 main weights ------------------------------------
SCRATCH_NUMEL = 2 ** 22  # MainWeights.flush_grads beside fused GEMMs: gradients up to this size via an fp32 scratch


def flat_views(flat: torch.Tensor, tensors: list) -> list:
    """Consecutive slices of the 1-D `flat`, shaped as each of `tensors` in turn."""
    views, off = [], 0
    for t in tensors:
        views.append(flat[off:off + t.numel()].view_as(t))
        off += t.numel()
    return views


def cast_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating parameters and buffers to `dtype` in place (tied parameters stay
    tied: the Parameter objects are kept). The FAE keeps its dtype: its encoder turns pixels into the
    flow's variables, which stay fp32; so do FP8 amax histories (megaflow/fp8.py)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype != dtype and "fae" not in name.split(".") \
                and not name.endswith(".fp8_amax_history"):
            t.data = t.data.to(dtype)


class MainWeights:
    """Megatron-style mixed precision around AdamW: the model computes with bf16 parameters, the
    optimizer steps fp32 main copies of them, and the bf16 weights are refreshed from the main ones
    after each step: no per-step weight cast in the forward.

    Build it on the fp32 model: the main copies are the exact fp32 weights (an init or a loaded
    checkpoint), then the model's parameters become `param_dtype`. The bf16 parameters and the fp32
    main weights each live in one flat buffer (the tensors are views into it), so refreshing the
    weights is one copy kernel. Gradients, two ways:
      flat_grads=True   (one backward per step: PlainEngine) backward hands each parameter its own
                        bf16 gradient (nothing zeroed or accumulated into beforehand); one foreach
                        cast copies them into the fp32 main gradients, which are views of one flat
                        buffer, and frees them. Almost no host work per step.
      flat_grads=True, bf16_grads=True  (train.bf16_grads) the same, kept in the model's dtype: one flat
                        bf16 gradient buffer (`flat_grad`), which the gradient norm (fp32 accumulation) and
                        the flat AdamW (upcast as it reads) read; no fp32 gradient exists. With one backward
                        nothing is accumulated, so each gradient is the bf16 GEMM output either way and the
                        fp32 copy adds no precision: the same update, 9 GB a step less memory traffic on
                        h200_1b. `wgrad_fused` weights (parallel/wgrad_fusion.py, write mode) have their GEMM
                        write into their view of the buffer; the rest are copied in (`grads_to_main`).
      flat_grads=False  (micro-batches: the pipeline engine) a post-accumulate-grad hook writes
                        each bf16 gradient into its fp32 main gradient as soon as it is ready (the
                        step's first one copied, later ones added) and frees it, so micro-batches
                        accumulate in fp32; `settle_grads()` zeros what no backward reached. With
                        `defer` set the hooks leave the gradients be and `flush_grads()`, after the
                        backward, does the same copies and adds in two foreach calls (the same
                        numbers, without a Python hook and a kernel launch per parameter).
                        With `wgrad_fused` (parallel/wgrad_fusion.py: those weights' GEMMs add their gradients
                        into the main ones themselves) the buffer is zeroed at `zero_grad` and every
                        gradient is added.
    With param_dtype fp32 it is a plain AdamW over the parameters themselves (nothing copied).

    `params` are what gradient code works on: the main tensors (`.grad` is the fp32 gradient);
    data-parallel reduction and clipping use them. `optimizer` is torch's AdamW over them; its state
    keys match an fp32 run's, so optimizer files load across param dtypes."""

    def __init__(self, model: torch.nn.Module, groups: list, tcfg, param_dtype: torch.dtype = torch.float32,
                 flat_grads: bool = True, fused: Optional[bool] = None, flat_step: Optional[bool] = None,
                 bf16_grads: bool = False):
        self.model_params = [p for g in groups for p in g["params"]]
        self.mixed, self.flat_grads = param_dtype != torch.float32, flat_grads
        if bf16_grads and not (self.mixed and flat_grads and flat_step is not False):
            raise ValueError(f"bf16 gradients (train.bf16_grads=on) need bf16 weights, one backward per step and the "
                             f"flat AdamW step; here param_dtype={param_dtype}, flat_grads={flat_grads}, "
                             f"flat_step={flat_step}: set train.bf16_grads=off (or train.param_dtype=bf16)")
        self.bf16_grads = bf16_grads
        self.flat_grad: Optional[torch.Tensor] = None  # bf16_grads: the model-dtype gradients, one flat buffer
        self.flat_main_grad: Optional[torch.Tensor] = None  # fp32 main gradients (bf16_grads: only after a fallback)
        if self.mixed:
            self._build_buffers(model, param_dtype)
            groups = [{**g, "params": [self.main[id(p)] for p in g["params"]]} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
        if fused if fused is not None else self.params[0].device.type == "cuda":
            kwargs["fused"] = True  # the fused kernel is exact AdamW; on CPU the foreach path is the tested one
        self.optimizer = torch.optim.AdamW(groups, **kwargs)
        # one pass over the flat buffers (megaflow/flat_adamw.py) instead of torch's fused AdamW and the
        # bf16 refresh copy: by default with mixed precision, flat gradients and the fused kernel (CUDA)
        cuda = self.params[0].device.type == "cuda"
        self.flat_step = bool(self.mixed and flat_grads and (flat_step if flat_step is not None
                                                             else bf16_grads or cuda and kwargs.get("fused", False)))
        # train.moments_dtype: the flat step's two AdamW moments in fp32 or bf16 ('auto': bf16 wherever the flat step
        # runs); torch's AdamW keeps them in the main weights' fp32, so bf16 ones exist only in the flat step
        self.moments_mode = getattr(tcfg, "moments_dtype", "fp32")
        if self.moments_mode == "bf16" and not self.mixed:
            raise ValueError(f"train.moments_dtype=bf16 needs bf16 weights with fp32 main weights (the flat AdamW step); "
                             f"here param_dtype={param_dtype}: set train.param_dtype=bf16 or train.moments_dtype=fp32")
        # [(start, end, then)] or None (all): the flat step updates only these ranges of the flat buffers, calling
        # then() (if not None) after each (parallel/dist_optimizer.py: this rank's shard, each chunk's all-gather)
        self.ranges: Optional[list] = None
        self._unwritten = set()  # flat_grads=False: ids of parameters whose main gradient this step has not written
        self.wgrad_fused = set()  # ids of weights whose GEMMs add to their main gradient (parallel/wgrad_fusion.py)
        # bf16_grads with wgrad_fused: {id(weight): key} and the keys those GEMMs wrote this step, a set that
        # parallel/wgrad_fusion.py fills (WRITTEN) and zero_grad empties
        self.wgrad_keys: dict = {}
        self.grads_written: Optional[set] = None
        self._scratches = {}  # `_scratch`: (ids of a flush's parameters) -> fp32 views of one buffer
        self.defer = False  # flat_grads=False: the hooks keep the bf16 gradients for `flush_grads`
        self._flat = None  # (moments, decay mask, [(state, exp_avg view, exp_avg_sq view)], steps), built at the first step
        self._kinds = {}  # (a, b) -> flat_adamw.decay_kinds of the decay mask's [a:b]

    @torch.no_grad()
    def _build_buffers(self, model, param_dtype) -> None:
        # model order (not group order): the fp32 gradients of neighbouring layers are neighbours in
        # the flat buffer, so data-parallel buckets (reverse model order) reduce slices of it in place
        order = {id(p): i for i, p in enumerate(model.parameters())}
        ps = self.model_params = sorted(self.model_params, key=lambda p: order.get(id(p), len(order)))
        n, device = sum(p.numel() for p in ps), ps[0].device
        self.flat_main = torch.empty(n, dtype=torch.float32, device=device)
        self.flat_param = torch.empty(n, dtype=param_dtype, device=device)
        if self.bf16_grads:
            self.flat_grad = torch.zeros(n, dtype=param_dtype, device=device)
        else:
            self.flat_main_grad = torch.zeros(n, dtype=torch.float32, device=device)
        self.grads = flat_views(self.flat_grad, ps) if self.bf16_grads else []  # bf16_grads: each parameter's view
        grads = flat_views(self.flat_main_grad, ps) if self.flat_main_grad is not None else [None] * len(ps)
        self.main = {}
        for p, main, param, grad in zip(ps, flat_views(self.flat_main, ps), flat_views(self.flat_param, ps), grads):
            main.copy_(p.detach())
            main.requires_grad_(True)
            main.grad = grad
            self.main[id(p)] = main
            param.copy_(p.detach())
            p.data = param
            p.grad = None
            if not self.flat_grads:
                p.register_post_accumulate_grad_hook(weak_hook(self, MainWeights._to_main))
        self.main_grads = [self.main[id(p)].grad for p in ps]  # (bf16_grads: None each)
        cast_params(model, param_dtype)  # the rest (frozen weights, buffers) follows

    def grad_of(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """bf16_grads: model parameter `p`'s view of the flat bf16 gradient buffer (None for any other tensor)."""
        if self.flat_grad is None:
            return None
        return next((view for q, view in zip(self.model_params, self.grads) if q is p), None)

    @torch.no_grad()
    def _to_main(self, p: torch.Tensor) -> None:
        if self.defer or p.grad is None:  # None: a fused GEMM added it already (parallel/wgrad_fusion.py)
            return
        if id(p) in self._unwritten:  # the step's first gradient: written over last step's (no zero pass)
            self._unwritten.discard(id(p))
            self.main[id(p)].grad.copy_(p.grad)
        else:
            self.main[id(p)].grad.add_(p.grad)
        p.grad = None

    @torch.no_grad()
    def flush_grads(self) -> None:
        """flat_grads=False with `defer`: after a backward, its bf16 gradients into the fp32 main ones
        (a parameter's first of the step copied, later ones added, as `_to_main` does) and freed."""
        ready = [p for p in self.model_params if p.grad is not None]
        first = [p for p in ready if id(p) in self._unwritten]
        later = [p for p in ready if id(p) not in self._unwritten]
        if first:
            torch._foreach_copy_([self.main[id(p)].grad for p in first], [p.grad for p in first])
            self._unwritten.difference_update(id(p) for p in first)
        if self.wgrad_fused:  # the many small unfused gradients (norms, biases) through an fp32 scratch: a bf16 + fp32
            small = [p for p in later if p.numel() <= SCRATCH_NUMEL]  # `_foreach_add_` runs one kernel a tensor,
            later = [p for p in later if p.numel() > SCRATCH_NUMEL]   # a cast and an add a few in all
            if small:
                scratch = self._scratch(small)
                torch._foreach_copy_(scratch, [p.grad for p in small])
                torch._foreach_add_([self.main[id(p)].grad for p in small], scratch)
        if later:
            torch._foreach_add_([self.main[id(p)].grad for p in later], [p.grad for p in later])
        for p in ready:
            p.grad = None

    def _scratch(self, params: list) -> list:
        """fp32 tensors shaped as `params`, views of one buffer made the first time this list of parameters comes
        (a flush's list is the same every micro-batch; used only beside fused GEMMs, where it is small)."""
        key = tuple(id(p) for p in params)
        if key not in self._scratches:
            flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
            self._scratches[key] = flat_views(flat, params)
        return self._scratches[key]

    def zero_grad(self) -> None:
        if not self.mixed:
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.bf16_grads:  # one backward: its fused GEMMs write (not add) again, `_grads_to_flat` does the rest
            if self.grads_written is not None:
                self.grads_written.clear()
        elif self.wgrad_fused:  # fused weight-gradient GEMMs add from the first micro-batch on: every hook adds too
            self.flat_main_grad.zero_()
            self._unwritten = set()
        elif not self.flat_grads:  # the hooks write each main gradient once, then add; `settle_grads` zeros the rest
            self._unwritten = {id(p) for p in self.model_params}
        for p in self.model_params:
            p.grad = None

    @torch.no_grad()
    def settle_grads(self) -> None:
        """flat_grads=False, after the step's last backward, before anything reads the main gradients:
        zero those no backward reached this step (their slice still holds the last step's). The same
        numbers as zeroing the whole buffer first and adding every gradient (0 + g == g), one pass over
        the fp32 gradients less (issue 17: +3.8 ms of hooks on the 0.9B config)."""
        if self._unwritten:
            torch._foreach_zero_([self.main[i].grad for i in self._unwritten])
            self._unwritten = set()

    @torch.no_grad()
    def grads_to_main(self) -> None:
        """After backward: the fp32 main gradients from the bf16 ones (flat mode; hooks did it otherwise)."""
        if not (self.mixed and self.flat_grads):
            return
        if self.bf16_grads:
            return self._grads_to_flat()
        have = [(main, p.grad) for main, p in zip(self.main_grads, self.model_params) if p.grad is not None]
        if len(have) < len(self.model_params):  # parameters this backward did not reach: zero gradient
            torch._foreach_zero_([main for main, p in zip(self.main_grads, self.model_params) if p.grad is None])
        if have:
            torch._foreach_copy_([main for main, _ in have], [g for _, g in have])  # bf16 -> fp32
        for p, view in zip(self.model_params, self.main_grads):  # both in model order (`params`: group order)
            p.grad = None
            main = self.main[id(p)]
            if main.grad is not view:  # replaced by someone: the optimizer reads the flat buffer again
                main.grad = view

    @torch.no_grad()
    def _grads_to_flat(self) -> None:
        """bf16_grads: the bf16 gradients backward handed the parameters copied into the flat bf16 buffer (one
        foreach copy, bf16 to bf16) and freed; a fused weight's GEMM wrote its view already (a weight that also
        got a gradient from autograd, an LM head tied to the token embedding, has that one added, as autograd
        would add them); a view nothing wrote this step is zeroed (a parameter this backward did not reach)."""
        written = self.grads_written if self.grads_written is not None else ()
        copy, add, missing = [], [], []
        for p, view in zip(self.model_params, self.grads):
            fused = self.wgrad_keys.get(id(p)) in written
            if p.grad is not None:
                (add if fused else copy).append((view, p.grad))
            elif not fused:
                missing.append(view)
            p.grad = None
        if missing:
            torch._foreach_zero_(missing)
        for pairs, op in ((copy, torch._foreach_copy_), (add, torch._foreach_add_)):
            if pairs:
                op([v for v, _ in pairs], [g for _, g in pairs])

    @torch.no_grad()
    def _grads_to_fp32(self) -> None:
        """bf16_grads, when the flat step does not apply after all (torch's AdamW steps instead): the fp32 main
        gradients made from the bf16 ones (the buffer allocated the first time), divided by the clipping's
        grad_scale where torch's (unfused) AdamW would not read it."""
        if self.flat_main_grad is None:
            self.flat_main_grad = torch.empty(self.flat_grad.numel(), dtype=torch.float32, device=self.flat_grad.device)
            self.main_grads = flat_views(self.flat_main_grad, self.model_params)
            for p, grad in zip(self.model_params, self.main_grads):
                self.main[id(p)].grad = grad
        self.flat_main_grad.copy_(self.flat_grad)
        scale = getattr(self.optimizer, "grad_scale", None)
        if scale is not None and not self.optimizer.defaults.get("fused"):
            self.flat_main_grad.div_(scale)
            self.optimizer.grad_scale = None  # divided already (clip_and_step removes the attribute)

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step (with the optimizer's `grad_scale` / `found_inf` when set, as torch's fused
        kernel reads them), then the bf16 weights from the main ones."""
        if self._flat_ready():
            return self._flat_adamw()
        if self.bf16_grads:
            self._grads_to_fp32()
        self.optimizer.step()
        if self.mixed:
            self.flat_param.copy_(self.flat_main)
        for _, _, then in self.ranges or ():  # every range stepped (more than asked: the owners' values win)
            if then is not None:
                then()

    def _flat_ready(self) -> bool:
        """Whether the flat one-pass step applies now: flat_step, one lr / betas / eps for every group,
        weight decay 0 or one value, plain AdamW (no amsgrad, maximize, differentiable), the main
        gradients still the flat buffer's views; the moments are (re)pointed into flat buffers here."""
        groups = self.optimizer.param_groups
        g0 = groups[0]
        if not self.flat_step or \
                any(g[k] is not g0[k] and _differ(g[k], g0[k]) for g in groups for k in ("lr", "betas", "eps")) or \
                len({g["weight_decay"] for g in groups} - {0.0}) > 1 or \
                any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable") for g in groups) or \
                not self.bf16_grads and any(self.main[id(p)].grad is not v
                                            for p, v in zip(self.model_params, self.main_grads)):
            if self.moments_mode == "bf16":
                raise ValueError("train.moments_dtype=bf16 needs the flat AdamW step, which this run does not take (it "
                                 "needs CUDA's fused AdamW or train.bf16_grads=on, one lr, betas and eps for every "
                                 "parameter group and plain AdamW): set train.moments_dtype=fp32")
            return False
        self._flat_moments()
        return True

    def _flat_moments(self) -> None:
        """AdamW's state as views of two flat buffers (train.moments_dtype) in the main weights' layout: made at the
        first step (zeros, step 0, as torch starts), and re-made from whatever torch's load_state_dict
        (or a checkpoint loader) put in the state since (its values copied in)."""
        state = self.optimizer.state
        mains = [self.main[id(p)] for p in self.model_params]
        if self._flat is not None and all(state.get(m) is st and st.get("exp_avg") is a and st.get("exp_avg_sq") is b
                                          for m, (st, a, b) in zip(mains, self._flat[2])):
            return
        n, device = self.flat_main.numel(), self.flat_main.device
        dtype = torch.float32 if self.moments_mode == "fp32" else torch.bfloat16  # 'bf16' or 'auto' (the flat step runs)
        moments = self._flat[0] if self._flat is not None else torch.zeros(2, n, dtype=dtype, device=device)
        decay = torch.zeros(n, dtype=torch.bool, device=device)
        wd = {id(p): g["weight_decay"] for g in self.optimizer.param_groups for p in g["params"]}
        views = []
        for m, d, *pair in zip(mains, flat_views(decay, mains), flat_views(moments[0], mains),
                               flat_views(moments[1], mains)):
            st = state[m]  # a defaultdict: {} for a parameter not stepped yet
            if wd[id(m)] != 0.0:
                d.fill_(True)
            for key, view in zip(("exp_avg", "exp_avg_sq"), pair):
                view.copy_(st[key]) if key in st else view.zero_()
                st[key] = view
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=device)  # torch's fused layout
            views.append((st, *pair))
        self._flat = (moments, decay, views, [st["step"] for st, _, _ in views])

    def _decay_kinds(self, decay: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """flat_adamw.decay_kinds of decay[a:b], made at its first step and kept (the mask is fixed for the run; the
        eager steps before a CUDA graph capture make it)."""
        from megaflow.flat_adamw import decay_kinds
        key = (a, b)
        if key not in self._kinds:
            self._kinds[key] = decay_kinds(decay[a:b])
        return self._kinds[key]

    def _flat_adamw(self) -> None:
        from megaflow.flat_adamw import KERNEL, adamw_reference, adamw_triton, step_coefficients
        moments, decay, _, steps = self._flat
        opt, g = self.optimizer, self.optimizer.param_groups[0]
        found_inf = getattr(opt, "found_inf", None)
        # every main weight steps every time (grads_to_main gives each a gradient), so the counts agree.
        # A skipped step (found_inf) adds 0, as a list of tensors like torch's fused AdamW: given one
        # 0-d tensor, `_foreach_add_` binds it to its Scalar overload, a host read of the device flag
        # (a sync every step, which a CUDA graph capture refuses: train.step_graph=on failed for it)
        increment = [1 - found_inf] * len(steps) if found_inf is not None else 1
        torch._foreach_add_(steps, increment)
        wd = max(gr["weight_decay"] for gr in opt.param_groups)
        rest = (steps[0], g["lr"], g["betas"][0], g["betas"][1], g["eps"], wd, getattr(opt, "grad_scale", None),
                found_inf)
        ranges = self.ranges or [(0, self.flat_main.numel(), None)]
        several = len(ranges) > 1 and self.flat_main.is_cuda  # the step's coefficients made once for every range
        coef = step_coefficients(steps[0], g["lr"], g["betas"][0], g["betas"][1], wd) if several else None
        grad = self.flat_grad if self.bf16_grads else self.flat_main_grad
        for a, b, then in ranges:
            args = (self.flat_main[a:b], grad[a:b], moments[0, a:b], moments[1, a:b],
                    self.flat_param[a:b], decay[a:b], *rest)
            if not self.flat_main.is_cuda:
                adamw_reference(*args)
            elif not KERNEL.call(True, lambda: adamw_triton(*args, coef=coef, kinds=self._decay_kinds(decay, a, b))
                                 or True, lambda: False):
                if moments.dtype == torch.float32:
                    # the kernel did not run (nothing written; it is built, and so fails, at the first range):
                    # torch's fused AdamW from now on
                    torch._foreach_sub_(steps, increment)
                    self.flat_step = False
                    return self.step()
                adamw_reference(*args)  # torch's AdamW has no bf16 moments: the definition, in torch ops
            if then is not None:
                then()

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of all main gradients (0-d, on the device): one reduction over the flat buffer
        under mixed precision (bf16_grads: over the bf16 one, accumulated in fp32)."""
        if self.bf16_grads:
            return torch.linalg.vector_norm(self.flat_grad, dtype=torch.float32)
        if self.mixed:
            return torch.linalg.vector_norm(self.flat_main_grad)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def clip_and_step(self, max_norm: float, norm: Optional[torch.Tensor] = None) -> tuple:
        """torch's clip_grad_norm_(params, max_norm) (no clipping when max_norm <= 0), then
        `step_if_finite`; returns (norm, skipped) as 0-d tensors, nothing read back. `norm`: the
        gradients' norm when the caller computed it (over a split model). The fused kernel (CUDA)
        takes the clipping as its grad_scale (it divides each gradient as it reads it), so no separate
        pass rewrites the gradients; elsewhere they are scaled in place first."""
        norm = self.grad_norm() if norm is None else norm
        if max_norm <= 0:
            return norm, self.step_if_finite(norm)
        if not self.optimizer.defaults.get("fused") and not self.bf16_grads:  # (bf16_grads: the flat step's grad_scale)
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm)
            return norm, self.step_if_finite(norm)
        # clip_grad_norm_ multiplies by min(max_norm / (norm + 1e-6), 1); the kernel divides by its inverse
        self.optimizer.grad_scale = ((norm.detach() + 1e-6) / max_norm).clamp(min=1.0)
        try:
            return norm, self.step_if_finite(norm)
        finally:
            del self.optimizer.grad_scale

    def step_if_finite(self, norm: torch.Tensor) -> torch.Tensor:
        """`step()` unless the gradient norm is NaN/Inf; returns 1.0 (skipped) or 0.0 as a 0-d tensor.
        With the fused kernel (CUDA) the decision stays on the device: `found_inf` makes AdamW leave
        weights, moments and its step count untouched (as under torch's GradScaler), so nothing is read
        back. Elsewhere the flag is read here and the step is not taken."""
        bad = (~torch.isfinite(norm.detach())).float()
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = bad  # 0-d, like the per-parameter step counts it is subtracted from
            try:
                self.step()  # a skipped update leaves flat_main as it was, so the copy keeps the weights
            finally:
                del self.optimizer.found_inf
        elif not bad.item():  # skipped: the gradients stay until the next zero_grad (main grads are views
            self.step()       # of one flat buffer under mixed precision: never set them to None here)
        return bad

    def main_of(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 main weight of model parameter `p` (p itself without mixed precision)."""
        return self.main[id(p)] if self.mixed else p

    def full_precision_state(self, model: torch.nn.Module, copy: bool = True) -> dict:
        """`model.state_dict()` with every trained parameter replaced by its fp32 main weight, and
        the other floating entries in fp32: what a checkpoint's model.pt holds. copy=False, to read
        only (the finite check before a save): the main weights themselves and the other entries
        in their own dtype, nothing copied."""
        state = model.state_dict()
        if not self.mixed:
            return state
        out = {k: v.float() if copy and v.is_floating_point() else v for k, v in state.items()}
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in self.main and n in out:
                main = self.main[id(p)].detach()
                out[n] = main.clone() if copy else main
        return out


def _differ(a, b) -> bool:
    """Two param-group settings differ; a learning rate held as a tensor (train.step_graph's, one
    object shared by every group) is compared by identity only, so nothing is read on the host."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return True
    return a != b


def resolve_param_dtype(name: str, autocast_dtype, device: torch.device) -> torch.dtype:
    """train.param_dtype: 'auto' is bf16 when the run computes in bf16 on a GPU, else fp32."""
    if name == "auto":
        return torch.bfloat16 if autocast_dtype == torch.bfloat16 and device.type == "cuda" else torch.float32
    if name in ("fp32", "bf16"):
        if name == "bf16" and autocast_dtype != torch.bfloat16:
            raise ValueError("train.param_dtype=bf16 needs train.dtype=bf16 (bf16 compute); set both, "
                             "or param_dtype=fp32")
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    raise ValueError(f"train.param_dtype={name!r} must be 'auto', 'fp32' or 'bf16'")


def resolve_bf16_grads(mode: str, param_dtype: torch.dtype, device: torch.device, data_parallel: bool) -> bool:
    """train.bf16_grads for a one-backward engine (PlainEngine): 'auto' is on with bf16 weights on CUDA without
    data parallelism (where it is exact and measured faster), 'on' there and on the CPU (its reference ops),
    'off' never. 'on' where it cannot work is an error naming what to change."""
    if mode == "off":
        return False
    if mode == "on":
        if param_dtype == torch.float32:
            raise ValueError("train.bf16_grads=on keeps bf16 gradients beside fp32 main weights: set "
                             "train.param_dtype=bf16 (with train.dtype=bf16), or train.bf16_grads=off")
        if data_parallel:
            raise ValueError("train.bf16_grads=on is for one process: data parallelism sums the fp32 main gradients; "
                             "set train.bf16_grads=off (or auto)")
        return True
    if mode == "auto":
        return param_dtype != torch.float32 and device.type == "cuda" and not data_parallel
    raise ValueError(f"train.bf16_grads={mode!r} must be 'auto', 'on' or 'off'")
