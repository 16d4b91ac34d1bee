"""Generation through a pipelined model: correct, not fast.

`PipelinedModel(stages, topo)` stands in for the STARFlow2 model in megaflow.model.generate: pass it
as `model` to `sample_text`, `sample_images(..., do_denoise=False)` or `generate` (text-only output)
on EVERY rank of the pipeline, with the same arguments and seed. The model's own Decoder then runs
unchanged: its per-step `embed` runs on the first stage, its loop over `units` becomes one pass of
the state tuple through the stages (send/recv, one stage after the other), and each stage's KV
cache stays local (the Decoder's cache dict is keyed per attention layer, and a rank only holds
its own layers). What the sampling loop reads back (next-token logits, the Gaussian parameters,
FAE/shallow-flow results) is computed on the stage that owns it and broadcast to the pipeline,
so every rank draws the same samples.

The score-based denoise step (a gradient through all stages) runs in parallel/pipeline_denoise.py
(`score_step`, which megaflow.model.generate.denoise calls).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from parallel.pipeline_comm import PipelineComm, state_shapes


class _Broadcast:
    """Run `fn(*args, **kwargs)` on the pipeline rank `src` (0 = first, -1 = last stage) and broadcast
    the result, whose shapes `shapes_fn(*args)` gives, to the other ranks of the pipeline, in the
    model's dtype, or at least fp32 (`wide`: the flow's variables and parameters, as flow.py keeps them)."""

    def __init__(self, owner: "PipelinedModel", src: int, fn, shapes_fn, wide: bool = False):
        self.owner, self.src, self.fn, self.shapes_fn = owner, src, fn, shapes_fn
        self.wide = wide

    def __call__(self, *args, **kwargs):
        o = self.owner
        if torch.is_grad_enabled():
            raise NotImplementedError("a gradient through a pipelined model runs in its score_step "
                                      "(parallel/pipeline_denoise.py), not through this broadcast")
        shapes = self.shapes_fn(*args)
        dtype = torch.promote_types(o.dtype, torch.float32) if self.wide else o.dtype
        if o.topo.pp_rank == self.src % o.topo.pp:
            outs = self.fn(*args, **kwargs)
            outs = tuple(t.to(dtype) for t in ((outs,) if isinstance(outs, torch.Tensor) else outs))
        else:
            outs = tuple(torch.empty(s, dtype=dtype, device=o.device) for s in shapes)
        if o.topo.pp > 1:
            for t in outs:
                dist.broadcast(t, src=o.topo.pp_ranks[self.src], group=o.topo.pp_group)
        return outs[0] if len(shapes) == 1 else outs


class PipelinedModel:
    """The parts of STARFlow2's interface that megaflow.model.generate uses, over pipeline stages."""

    def __init__(self, stages: list, topo, comm: PipelineComm = None):
        self.stages, self.topo = stages, topo
        self.comm = comm or PipelineComm(topo, interleaved=len(stages) > 1)
        m0 = stages[0].module
        self.cfg, self.flow_in = m0.cfg, m0.flow_in
        self.dtype, self.device = m0.flow_in.weight.dtype, m0.flow_in.weight.device
        first = stages[0].module if stages[0].is_first else None
        last = stages[-1].module if stages[-1].is_last else None
        cfg, N, D = self.cfg, self.cfg.fae.n_tokens, self.cfg.fae.latent_dim
        img = (cfg.fae.channels, cfg.fae.image_size, cfg.fae.image_size)
        self.fae = SimpleNamespace(
            encode=_Broadcast(self, 0, lambda x: first.fae.encode(x), lambda x: [(x.shape[0], N, D)]),
            decode=_Broadcast(self, 0, lambda y: first.fae.decode(y), lambda y: [(y.shape[0], *img)]))
        shallow = _Broadcast(self, 0, lambda x: first.shallow(x), lambda x: [x.shape, x.shape[:1], x.shape[:1]], True)
        # sampling options (method, tol, ...) pass through; the iteration stats fill on the first stage only
        shallow.inverse = _Broadcast(self, 0, lambda y, **kw: first.shallow.inverse(y, **kw), lambda y: [y.shape], True)
        self.shallow = shallow
        vocab = cfg.vocab_size
        # full-vocabulary logits (gathered over tensor parallelism on the last stage) are broadcast
        self.text_logits = _Broadcast(self, -1, lambda h: last.vocab_gather(last.text_logits(h)),
                                      lambda h: [(*h.shape[:2], vocab)])
        self.vocab_gather = torch.nn.Identity()
        self.flow_params = _Broadcast(self, -1, lambda h: last.flow_params(h), lambda h: [(*h.shape[:2], D)] * 2, True)
        self.units = {"pipeline": self._run_stages}  # the Decoder loops over units.values()

    def eval(self) -> "PipelinedModel":
        for st in self.stages:
            st.module.eval()
        return self

    def score_step(self, dec, rows: int, start: int, latents: torch.Tensor) -> torch.Tensor:
        """generate.denoise through the stages: parallel/pipeline_denoise.py."""
        from parallel.pipeline_denoise import pipelined_denoise
        return pipelined_denoise(self, dec, rows, start, latents)

    def context(self, *args, **kwargs):
        return self.stages[0].module.context(*args, **kwargs)

    def embed(self, batch: dict, ctx, noise=None, flow_x=None, vlm_x=None):
        if self.stages[0].is_first:
            return self.stages[0].module.embed(batch, ctx, noise, flow_x, vlm_x)
        return None  # the state arrives from the previous stage in _run_stages

    def _run_stages(self, state, ctx):
        """The state tuple through all stages in order; returns the final state on the last stage
        and zeros of its shape elsewhere (only what the broadcasts hand out is read there)."""
        pp = self.topo.pp
        R, q = ctx.image_mask.shape[:2]
        shapes = state_shapes(self.stages[0].module, R, q)
        for st in self.stages:
            if not st.is_first:
                state = self.comm.recv(shapes, self.dtype, self.device, "act", (st.index - 1) % pp)
            for unit in st.module.units.values():
                state = unit(state, ctx)
            if not st.is_last:
                self.comm.send(state, "act", (st.index + 1) % pp)
        self.comm.wait_sends()
        if not self.stages[-1].is_last:
            state = tuple(torch.zeros(s, dtype=self.dtype, device=self.device) for s in shapes)
        return state
