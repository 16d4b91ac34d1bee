"""Generation's score-based denoise step through a pipelined model: x <- x + sigma^2 * grad_x log p(x)
(megaflow.model.generate.denoise), with the gradient carried back through the pipeline stages.

Forward: the first stage runs the shallow flows on x (with gradient) and embeds; every stage runs
its units and sends the state on, as PipelinedModel._run_stages does, keeping its input and output.
The last stage computes the deep flow's part of log p from its final state: (mu, sigma) from the
flow head at the image's positions, y read from the state's flow_x (the units pass it through
unchanged, so its gradient reaches the shallow flows). Backward: each stage sends the gradient of
log p with respect to its input state to the stage before; the first stage adds the shallow
flows' log|det| and takes the gradient with respect to x, which it broadcasts to the pipeline.
Every rank of the pipeline calls it with the same arguments and gets the same latents; tensor
parallelism inside a stage reduces in its layers' forward and backward as in training.
Not here: the sampling loop (megaflow/model/generate.py), the forward-only pass (pipeline_generate.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.pipeline_comm import state_dtypes, state_shapes


def _stage_forward(piped, x, batch: dict, ctx, dec, rows: int, start: int) -> tuple:
    """[(stage, input state or None, output state)] of this rank's stages, and the shallow log|det|."""
    pp, N = piped.topo.pp, x.shape[1]
    m0 = piped.stages[0].module
    shapes, dtypes = state_shapes(m0, rows, dec.length), state_dtypes(m0)
    kept, logdet = [], None
    for st in piped.stages:
        if st.is_first:
            y, logdet, _ = st.module.shallow(x)  # (rows, N, D)
            flow_x = torch.cat([dec.flow_x[:rows, :start], y, dec.flow_x[:rows, start + N:]], 1)  # (rows, L, D)
            inputs, state = None, st.module.embed(batch, ctx, flow_x=flow_x, vlm_x=dec.vlm_x[:rows])
        else:
            got = piped.comm.recv(shapes, dtypes, piped.device, "act", (st.index - 1) % pp)
            inputs = tuple(t.requires_grad_() for t in got)
            state = inputs
        for unit in st.module.units.values():
            state = unit(state, ctx)
        kept.append((st, inputs, state))
        if not st.is_last:
            piped.comm.send(state, "act", (st.index + 1) % pp)
    piped.comm.wait_sends()
    return kept, logdet, shapes, dtypes


def pipelined_denoise(piped, dec, rows: int, start: int, latents: torch.Tensor) -> torch.Tensor:
    """generate.denoise for `piped` (a parallel.pipeline_generate.PipelinedModel): latents (rows, N, D)."""
    sig2 = piped.cfg.flow.noise_std ** 2
    if sig2 == 0:
        return latents
    topo, pp, N = piped.topo, piped.topo.pp, latents.shape[1]
    batch = {"tokens": dec.tokens[:rows], "position_ids": dec.pos[:rows], "image_mask": dec.image_mask[:rows],
             "doc_ids": dec.doc[:rows] if bool((dec.doc < 0).any()) else None}
    ctx = piped.context(batch, dec.cond_keep[:rows])
    grad = torch.empty_like(latents)
    with torch.enable_grad():
        x = latents.detach().requires_grad_(True)
        kept, logdet, shapes, dtypes = _stage_forward(piped, x, batch, ctx, dec, rows, start)
        for st, inputs, state in reversed(kept):
            if st.is_last:
                mu, sigma = st.module.flow_params(state[1][:, start - 1:start + N - 1])  # the image's tokens
                z = (state[2][:, start:start + N] - mu) / sigma
                outs, grads = [(-0.5 * z.pow(2) - sigma.log()).sum()], [None]
            else:
                got = piped.comm.recv(shapes, dtypes, piped.device, "grad", (st.index + 1) % pp)
                outs, grads = list(state), list(got)
            if st.is_first:
                outs, grads = outs + [logdet.sum()], grads + [None]
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
            targets = (x,) if st.is_first else inputs
            back = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
            back = [torch.zeros_like(t) if b is None else b for t, b in zip(targets, back)]
            if st.is_first:
                grad = back[0]
            else:
                piped.comm.send(tuple(back), "grad", (st.index - 1) % pp)
        piped.comm.wait_sends()
    if pp > 1:
        grad = grad.contiguous()
        dist.broadcast(grad, src=topo.pp_ranks[0], group=topo.pp_group)
    return (latents + sig2 * grad).detach()
