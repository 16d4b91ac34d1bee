"""Generation: one KV-cached loop over an interleaved sequence.

Text tokens come from the LM head; after an image-start token the deep flow samples the image's
latent tokens one at a time (each goes straight into the KV cache of both streams), guided by
STARFlow's product-of-Gaussians rule; then the shallow flows run in reverse, one score-based
denoise step is taken through the flow itself, and the FAE decodes pixels. Text after the image
continues from the same cache. When the VLM reads FAE latents (model.adapter_input == "latent",
the default), the finished image's slots are re-encoded once, as one chunk of N positions, so that
the VLM's cache holds the image it will talk about (the flow stream's entries are recomputed from
the same inputs); with "flow" the sampled tokens are final as they are fed.

Speed (issue 14): the Decoder's per-position state and the KV caches are preallocated
(megaflow/model/decoding.py); a one-token step (an image latent of all rows, conditional and
unconditional, or a text token) reads and writes only those buffers, so on CUDA it runs as a
replayed CUDA graph. `method="jacobi"` samples the N latents of an image (and inverts each shallow
block) by block-wise Jacobi iteration instead of token by token; "sequential" is the reference.

`Decoder(use_cache=False)` recomputes the whole prefix at every step: the slow reference that the
cached path is tested against. Rows are left-padded to a common length (padding is its own
document, so it is never attended to by real tokens).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megaflow.model.decoding import (ConcatKVCache, StaticKVCache, StepGraphs, additive_mask, can_capture,
                                     causal_slot_mask)
from megaflow.model.flow import guided_params

Segment = Union[int, torch.Tensor]  # a token id, or an image (C, H, W) in [-1, 1]


FIELDS = ("tokens", "pos", "doc", "image_mask", "flow_x", "vlm_x")  # per-position state, (R, capacity[, D])


def _field(name: str):
    return property(lambda self: self._buf[name][:, :self.length], doc=f"{name} of the positions fed so far")


class Decoder:
    """Incremental decoding state of `rows` sequences: per-position buffers (tokens, positions,
    documents, image slots, latents) and the KV cache, preallocated for `capacity` positions (grown
    by doubling when exceeded). `cache`: "static" (default), "concat" (the earlier torch.cat cache,
    a reference) or None (recompute the whole prefix at every step: the slow reference).

    One-token steps (`image_step`, `text_step`) are the functions a CUDA graph captures: with
    `graphs` (default: on CUDA for a single-process model) they attend to all `capacity` slots, so
    their shapes never change, and are replayed; graphs=True on CPU runs the same shapes eagerly."""

    tokens, pos, doc, image_mask, flow_x, vlm_x = (_field(n) for n in FIELDS)

    def __init__(self, model, rows: int, cond_keep: Optional[torch.Tensor] = None, use_cache: bool = True,
                 capacity: int = 64, cache: str = "static", graphs: Optional[bool] = None):
        self.model = model
        self.dev, self.dtype = model.flow_in.weight.device, model.flow_in.weight.dtype
        self.length, self.capacity = 0, 0
        self.cond_keep = cond_keep if cond_keep is not None else torch.ones(rows, device=self.dev)
        if not use_cache:
            cache = None
        if cache not in ("static", "concat", None):
            raise ValueError(f"unknown KV cache {cache!r}; choose 'static', 'concat' or None")
        self.cache = {"static": StaticKVCache, "concat": ConcatKVCache, None: lambda c: None}[cache](capacity)
        capture = can_capture(model) if graphs is None else bool(graphs) and self.dev.type == "cuda"
        self.static_shapes = cache == "static" and (capture or bool(graphs))
        self.graphs = StepGraphs(capture and cache == "static", model, self.static_shapes)
        self.slots = {}  # k -> (k,) long: where a graph-shaped step of k positions writes (persistent)
        self._buf = {}
        self.last_vlm = self.last_flow = None  # (R, 1, Dv), (R, 1, Df): the last fed position's states
        self.stats = {}  # iterations of the last image: {"deep": n, "shallow": [n per block]}
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        R, D, L = self.rows_total, self.model.cfg.fae.latent_dim, self.length
        wide = torch.promote_types(self.dtype, torch.float32)  # the flow's variables: at least fp32 (flow.py)
        kinds = {"tokens": (torch.long, ()), "pos": (torch.long, ()), "doc": (torch.long, ()),
                 "image_mask": (torch.bool, ()), "flow_x": (wide, (D,)), "vlm_x": (wide, (D,))}
        for name, (dtype, tail) in kinds.items():
            buf = torch.zeros(R, capacity, *tail, dtype=dtype, device=self.dev)
            if name in self._buf:
                buf[:, :L] = self._buf[name][:, :L]
            self._buf[name] = buf
        if self.cache is not None:
            self.cache.grow(capacity)
        self.capacity = capacity
        self.graphs.clear()  # captured graphs hold the old buffers

    @property
    def rows_total(self) -> int:
        return self.cond_keep.shape[0]

    @property
    def last(self) -> tuple:
        return self.last_vlm, self.last_flow

    def _ensure(self, length: int) -> None:
        if length > self.capacity:
            self._grow(max(length, 2 * self.capacity))

    def _forward(self, slots: torch.Tensor, kv_len: int) -> tuple:
        """Run the model on the positions at `slots` (T,), attending to slots [0, kv_len) (causal,
        within a document). Keeps the last position's states; returns (h_vlm, h_flow) (R, T, .)."""
        b = self._buf
        take = lambda name: b[name].index_select(1, slots)  # noqa: E731  (R, T[, D])
        doc_q = take("doc")
        batch = {"tokens": take("tokens"), "position_ids": take("pos"), "image_mask": take("image_mask"),
                 "doc_ids": None}
        ctx = self.model.context(batch, self.cond_keep)
        # Padding (doc -1) attends to padding only, so no row is ever fully masked.
        mask = causal_slot_mask(slots, kv_len) & (doc_q[:, None, :, None] == b["doc"][:, None, None, :kv_len])
        mask = additive_mask(mask, self.dtype)  # (R, 1, T, kv_len)
        for actx in (ctx.vlm, ctx.flow):
            if actx is not None:
                actx.mask, actx.cache = mask, self.cache
        if self.cache is not None:
            self.cache.slots, self.cache.kv_len = slots, kv_len
        state = self.model.embed(batch, ctx, flow_x=take("flow_x"), vlm_x=take("vlm_x"))
        for unit in self.model.units.values():
            state = unit(state, ctx)
        h_vlm, h_flow = state[0], state[1]
        if self.last_flow is None or self.last_flow.shape[0] != h_flow.shape[0]:
            self.last_vlm, self.last_flow = h_vlm[:, -1:].clone(), h_flow[:, -1:].clone()
        else:  # in place: a captured graph reads and writes these very tensors
            self.last_vlm.copy_(h_vlm[:, -1:])
            self.last_flow.copy_(h_flow[:, -1:])
        return h_vlm, h_flow

    def feed(self, tokens: torch.Tensor, flow_x: Optional[torch.Tensor] = None,
             image_mask: Optional[torch.Tensor] = None, pad: Optional[torch.Tensor] = None,
             vlm_x: Optional[torch.Tensor] = None) -> tuple:
        """Append k positions to every row: tokens (R, k), flow_x (R, k, D), image_mask (R, k),
        pad (R, k) bool marks left padding, vlm_x (R, k, D) the FAE latents at image slots (when
        known). Runs the model on the new positions; returns their (h_vlm, h_flow) (R, k, .)."""
        R, k = tokens.shape
        L = self.length
        self._ensure(L + k)
        b = self._buf
        pad = torch.zeros_like(tokens, dtype=torch.bool) if pad is None else pad
        real_before = (b["doc"][:, :L] >= 0).sum(1, keepdim=True)  # (R, 1)
        b["pos"][:, L:L + k] = (real_before + (~pad).long().cumsum(1) - 1).clamp(min=0)
        b["tokens"][:, L:L + k] = tokens
        b["doc"][:, L:L + k] = torch.where(pad, -1, 0)
        b["image_mask"][:, L:L + k] = False if image_mask is None else image_mask
        b["flow_x"][:, L:L + k] = 0.0 if flow_x is None else flow_x
        b["vlm_x"][:, L:L + k] = 0.0 if vlm_x is None else vlm_x
        self.length = L + k
        if self.cache is None:  # no cache: every position again
            h_vlm, h_flow = self._forward(torch.arange(L + k, device=self.dev), L + k)
            return h_vlm[:, L:], h_flow[:, L:]
        return self._forward(torch.arange(L, L + k, device=self.dev), L + k)

    def _step(self, token: torch.Tensor, flow_x: torch.Tensor, image_mask: torch.Tensor, kv_len: int) -> tuple:
        """k positions at `self.slots[k]` for every row (the graph-captured part): token (R, k),
        flow_x (R, k, D), image_mask (R, k); positions follow the one before. Returns their
        (h_vlm, h_flow) (R, k, .)."""
        b, k = self._buf, token.shape[1]
        slots = self.slots[k]
        first = slots[:1]
        b["pos"].index_copy_(1, slots, b["pos"].index_select(1, first - 1) + (slots - first + 1))
        for name, value in (("tokens", token), ("doc", torch.zeros_like(token)), ("image_mask", image_mask),
                            ("flow_x", flow_x), ("vlm_x", torch.zeros_like(flow_x))):
            b[name].index_copy_(1, slots, value.to(b[name].dtype))
        if self.cache is not None:
            return self._forward(slots, kv_len)
        h_vlm, h_flow = self._forward(torch.arange(kv_len, device=self.dev), kv_len)  # no cache: all again
        return h_vlm[:, -k:], h_flow[:, -k:]

    def _one(self, key, fn, *inputs):
        """Run the one-token step `fn(*inputs, kv_len)` at the next position (graphed when enabled)."""
        out = self.at_next(key, fn, 1, *inputs)
        self.length += 1
        return out

    def at_next(self, key, fn, k: int, *inputs):
        """Run `fn(*inputs, kv_len)`, a step of k positions written after the fed ones (graphed when
        enabled), without counting them as fed: Jacobi iterates on a window this way."""
        self._ensure(self.length + k)
        if k not in self.slots:
            self.slots[k] = torch.empty(k, dtype=torch.long, device=self.dev)
        torch.arange(self.length, self.length + k, out=self.slots[k])
        kv_len = self.capacity if self.static_shapes else self.length + k
        return self.graphs((key, k, kv_len), lambda *x: fn(*x, kv_len), *inputs)

    def image_step(self, z: torch.Tensor, rows: int, guidance: float, temperature: float) -> torch.Tensor:
        """Sample the next latent y (rows, 1, D) = mu + temperature * sigma * z from the last
        position's (guided) Gaussian and feed it to all rows (conditional, then unconditional)."""
        return self._one(("image", rows, guidance, temperature),
                         lambda zi, kv: self._image_step(zi, rows, guidance, temperature, kv), z)

    def _image_step(self, z, rows, guidance, temperature, kv_len) -> torch.Tensor:
        mu, sigma = self.model.flow_params(self.last_flow)  # (R, 1, D)
        if guidance > 0:
            mu, sigma = guided_params(mu[:rows], sigma[:rows], mu[rows:], sigma[rows:], guidance)
        y = mu + temperature * sigma * z  # (rows, 1, D)
        both = torch.cat([y, y]) if guidance > 0 else y
        R = both.shape[0]
        image = torch.full((R, 1), self.model.cfg.tokens.image_id, dtype=torch.long, device=y.device)
        self._step(image, both, torch.ones(R, 1, dtype=torch.bool, device=y.device), kv_len)
        return y

    def text_step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (R, 1) to every row; returns the next-token logits (R, V) (float)."""
        return self._one(("text",), self._text_step, token)

    def _text_step(self, token, kv_len) -> torch.Tensor:
        R, D = token.shape[0], self.model.cfg.fae.latent_dim
        self._step(token, torch.zeros(R, 1, D, dtype=self.dtype, device=token.device),
                   torch.zeros_like(token, dtype=torch.bool), kv_len)
        return self.next_logits()

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (state and KV cache)."""
        self.length = length
        if self.cache is not None:
            self.cache.truncate(length)

    def reencode_image(self, latents: torch.Tensor) -> None:
        """The last N positions are a finished image: give the VLM its FAE latents (N, D) or (R, N, D)
        and recompute those positions, so the cache holds what the VLM reads there (a no-op when the
        VLM reads the deep flow's own variable, which was final when fed)."""
        if self.model.cfg.adapter_input != "latent" or self.model.cfg.vlm is None:
            return
        N = latents.shape[-2]
        start = self.length - N
        tail = (self.tokens[:, start:].clone(), self.flow_x[:, start:].clone(), self.image_mask[:, start:].clone())
        self.truncate(start)
        self.feed(*tail, vlm_x=latents.expand(self.rows_total, -1, -1))

    def next_logits(self) -> torch.Tensor:
        return self.model.vocab_gather(self.model.text_logits(self.last_vlm))[:, -1].float()  # (R, V)

    def next_params(self):
        return self.model.flow_params(self.last_flow)  # each (R, 1, D)


def prompt_tensors(model, prompts: Sequence[Sequence[Segment]], noise_seed: int = 0):
    """Left-padded tokens (R, T), flow_x (R, T, D), image_mask (R, T), pad (R, T) and vlm_x (R, T, D)
    for prompts made of token ids and images. Input images go through the FAE and the shallow
    flows, with the training input noise (the VLM learnt to read noisy latents); vlm_x holds the
    noised FAE latents, flow_x the shallow flows' output."""
    cfg, tok = model.cfg, model.cfg.tokens
    N, D = cfg.fae.n_tokens, cfg.fae.latent_dim
    dev, dtype = model.flow_in.weight.device, model.flow_in.weight.dtype
    gen = torch.Generator(device="cpu").manual_seed(noise_seed)
    rows = []
    for prompt in prompts:
        ids, lat, img, fae = [], [], [], []
        for seg in prompt:
            if isinstance(seg, torch.Tensor):
                x = model.fae.encode(seg[None].to(dev, dtype))  # (1, N, D)
                x = x + cfg.flow.noise_std * torch.randn(x.shape, generator=gen).to(dev, dtype)
                y = model.shallow(x)[0][0]  # (N, D)
                zero = [torch.zeros(D, dtype=dtype, device=dev)]
                ids += [tok.boi_id] + [tok.image_id] * N + [tok.eoi_id]
                lat += zero + list(y) + zero
                fae += zero + list(x[0]) + zero
                img += [False] + [True] * N + [False]
            else:
                ids.append(int(seg))
                lat.append(torch.zeros(D, dtype=dtype, device=dev))
                fae.append(lat[-1])
                img.append(False)
        rows.append((ids, lat, img, fae))
    T = max(len(r[0]) for r in rows)
    tokens = torch.full((len(rows), T), tok.pad_id, dtype=torch.long, device=dev)
    flow_x = torch.zeros(len(rows), T, D, dtype=dtype, device=dev)
    vlm_x = torch.zeros_like(flow_x)
    image_mask = torch.zeros(len(rows), T, dtype=torch.bool, device=dev)
    pad = torch.ones(len(rows), T, dtype=torch.bool, device=dev)
    for r, (ids, lat, img, fae) in enumerate(rows):
        n = len(ids)
        tokens[r, T - n:] = torch.tensor(ids, device=dev)
        flow_x[r, T - n:] = torch.stack(lat)
        vlm_x[r, T - n:] = torch.stack(fae)
        image_mask[r, T - n:] = torch.tensor(img, device=dev)
        pad[r, T - n:] = False
    return tokens, flow_x, image_mask, pad, vlm_x


def sample_token(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def draw_noise(rows: int, N: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, N, D) standard normal, drawn token by token from `gen` (the order the samplers use)."""
    return torch.cat([torch.randn(rows, 1, D, generator=gen) for _ in range(N)], dim=1)


@torch.no_grad()
def sample_latents(dec: Decoder, rows: int, guidance: float, temperature: float, gen: torch.Generator,
                   z: Optional[torch.Tensor] = None, method: str = "sequential", tol: float = 1e-4,
                   max_iters: Optional[int] = None, chunk: int = 64):
    """Sample one image's N deep-flow latents, feeding them into the cache. `dec` holds `rows`
    conditional rows, followed by as many unconditional rows when guidance > 0. `z` (rows, N, D)
    gives the noise explicitly (the deep flow's inverse); by default it is drawn from `gen`.
    method "sequential": one latent per step (N steps, graphed on CUDA); "jacobi": windows of
    `chunk` latents in order, all latents of a window updated in parallel until the largest
    change is <= tol (at most max_iters, default the window's length - 1, after which it is exact).
    dec.stats["deep"] gets the number of steps, or of Jacobi iterations summed over windows.
    Returns y (rows, N, D), the deep flow's variable (before the shallow inverse)."""
    cfg = dec.model.cfg
    N, D = cfg.fae.n_tokens, cfg.fae.latent_dim
    z = (draw_noise(rows, N, D, gen) if z is None else z).to(dec.dev, dec.flow_x.dtype)  # at least fp32
    start = dec.length
    if method == "jacobi":
        return _jacobi_latents(dec, rows, guidance, temperature, z, tol, max_iters, chunk)
    if method != "sequential":
        raise ValueError(f"unknown sampling method {method!r}; choose 'sequential' or 'jacobi'")
    for i in range(N):
        dec.image_step(z[:, i:i + 1], rows, guidance, temperature)
    dec.stats["deep"] = N
    return dec.flow_x[:rows, start:start + N].clone()


def _jacobi_latents(dec: Decoder, rows, guidance, temperature, z, tol, max_iters, chunk) -> torch.Tensor:
    """Deep-flow block-wise Jacobi: windows of `chunk` latents in order; each iteration writes the
    window's current guess after the fed positions (graph-shaped, replayed on CUDA like a one-token
    step) and re-derives every latent from the states before it; once converged the window is fed."""
    model, N, R, D = dec.model, z.shape[1], dec.rows_total, z.shape[2]
    both = (lambda y: torch.cat([y, y])) if guidance > 0 else (lambda y: y)

    def update(h: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:  # states (R, B, Df) -> y (rows, B, D)
        mu, sigma = model.flow_params(h)
        if guidance > 0:
            mu, sigma = guided_params(mu[:rows], sigma[:rows], mu[rows:], sigma[rows:], guidance)
        return mu + temperature * sigma * zc

    ys, total, windows = [], 0, {}
    for c in range(0, N, chunk):
        k = min(c + chunk, N) - c
        y = windows.setdefault(k, z.new_empty(rows, k, D))  # one per length (graphs read it)
        image = torch.full((R, k), model.cfg.tokens.image_id, dtype=torch.long, device=dec.dev)
        slots = torch.ones(R, k, dtype=torch.bool, device=dec.dev)

        def iterate(zc: torch.Tensor, h0: torch.Tensor, kv_len: int) -> torch.Tensor:  # -> largest change
            # tensors made inside, not this window's `image`/`slots`: a captured graph outlives them
            _, h = dec._step(torch.full_like(image, model.cfg.tokens.image_id), both(y),
                             torch.ones_like(slots), kv_len)  # (R, k, Df)
            new = update(torch.cat([h0, h[:, :-1]], dim=1), zc)
            delta = (new - y).abs().amax()
            y.copy_(new)
            return delta

        h0 = dec.last_flow.clone()  # (R, 1, Df): the state before the window, params of its first latent
        y.copy_(update(h0.expand(-1, k, -1), z[:, c:c + k]))  # the first latent exact, the others a guess
        for _ in range(max_iters or k - 1):  # by then exact: the k-th latent is final after k updates
            delta = float(dec.at_next(("jacobi", rows, guidance, temperature), iterate, k, z[:, c:c + k], h0))
            total += 1
            if delta <= tol:
                break
        dec.feed(image, both(y), slots)
        ys.append(y.clone())
    dec.stats["deep"] = total
    return torch.cat(ys, dim=1)  # (rows, N, D)


def denoise(model, dec: Decoder, rows: int, start: int, latents: torch.Tensor) -> torch.Tensor:
    """One score step x <- x + sigma_noise^2 * grad_x log p(x), through the shallow flows and the
    deep flow in the context of the first `rows` rows of `dec`, whose image slots start at `start`."""
    if hasattr(model, "score_step"):  # a model split over processes carries the gradient its own way
        return model.score_step(dec, rows, start, latents)
    sig2 = model.cfg.flow.noise_std ** 2
    if sig2 == 0:
        return latents
    N = latents.shape[1]
    with torch.enable_grad():
        x = latents.detach().requires_grad_(True)
        y, logdet, _ = model.shallow(x)
        flow_x = torch.cat([dec.flow_x[:rows, :start], y, dec.flow_x[:rows, start + N:]], 1)
        L = flow_x.shape[1]
        batch = {"tokens": dec.tokens[:rows], "position_ids": dec.pos[:rows], "image_mask": dec.image_mask[:rows],
                 "doc_ids": dec.doc[:rows] if bool((dec.doc < 0).any()) else None}
        ctx = model.context(batch, dec.cond_keep[:rows])
        state = model.embed(batch, ctx, flow_x=flow_x, vlm_x=dec.vlm_x[:rows])
        for unit in model.units.values():
            state = unit(state, ctx)
        mu, sigma = model.flow_params(state[1][:, start - 1:start + N - 1])  # params of the image's tokens
        z = (y - mu) / sigma
        logp = (-0.5 * z.pow(2) - sigma.log()).sum() + logdet.sum()
        assert L == dec.length
        grad, = torch.autograd.grad(logp, x)
    return (x + sig2 * grad).detach()


def finish_image(model, dec: Decoder, rows: int, y: torch.Tensor, do_denoise: bool = True,
                 method: str = "sequential", tol: float = 1e-4, max_iters: Optional[int] = None,
                 graphs: Optional[bool] = None, chunk: int = 64) -> torch.Tensor:
    """Deep-flow latents (rows, N, D) -> pixels (rows, C, H, W) in [-1, 1]; the decoder's image
    slots are re-encoded with the final latents (the unconditional guidance rows get the same).
    The shallow flows are inverted with `method` (dec.stats["shallow"]: iterations per block)."""
    N = y.shape[1]
    dec.stats["shallow"] = []
    x = model.shallow.inverse(y, method=method, tol=tol, max_iters=max_iters, graphs=graphs,
                              stats=dec.stats["shallow"], chunk=chunk)
    if do_denoise:
        x = denoise(model, dec, rows, dec.length - N, x)
    dec.reencode_image(x.repeat(dec.rows_total // rows, 1, 1))
    return model.fae.decode(x.to(dec.dtype)).clamp(-1, 1)  # x is fp32 under bf16 weights; the FAE is not


@torch.no_grad()
def sample_images(model, prompts: Sequence[Sequence[Segment]], guidance: float = 0.0, temperature: float = 1.0,
                  seed: int = 0, use_cache: bool = True, do_denoise: bool = True, method: str = "sequential",
                  tol: float = 1e-4, max_iters: Optional[int] = None, graphs: Optional[bool] = None,
                  cache: str = "static", chunk: int = 64, z: Optional[torch.Tensor] = None):
    """Text (or interleaved) prompts -> one image each: image-start is appended to every prompt.
    `z` (R, N, D): the deep flow's noise, instead of drawing it from `seed` (draw_noise).
    `method` ("sequential", the reference, or "jacobi" within `tol`, windows of `chunk` tokens,
    sample_latents) applies to the deep flow and the shallow flows alike; `graphs` (default: on
    CUDA for a single-process model) replays one-token steps as CUDA graphs; `cache` as Decoder.
    Returns (images (R, C, H, W), the decoder positioned after the image's last latent; its
    `stats` holds the iterations of the deep flow and of each shallow block)."""
    tok = model.cfg.tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompts = [list(p) + [tok.boi_id] for p in prompts]
    R = len(prompts)
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, prompts, seed)
    cond_keep = torch.ones(R, device=tokens.device)
    if guidance > 0:
        tokens, flow_x, image_mask, pad, vlm_x = (torch.cat([t, t]) for t in (tokens, flow_x, image_mask, pad, vlm_x))
        cond_keep = torch.cat([cond_keep, torch.zeros_like(cond_keep)])
    capacity = tokens.shape[1] + model.cfg.fae.n_tokens
    dec = Decoder(model, tokens.shape[0], cond_keep, use_cache, capacity, cache, graphs)
    dec.feed(tokens, flow_x, image_mask, pad, vlm_x)
    y = sample_latents(dec, R, guidance, temperature, gen, z, method=method, tol=tol, max_iters=max_iters, chunk=chunk)
    return finish_image(model, dec, R, y, do_denoise, method, tol, max_iters, graphs, chunk), dec


@torch.no_grad()
def sample_text(model, prompts: Sequence[Sequence[Segment]], max_new_tokens: int = 32, temperature: float = 0.0,
                seed: int = 0, use_cache: bool = True, graphs: Optional[bool] = None, cache: str = "static") -> list:
    """Prompts (text and images) -> generated token ids per row, stopping at end-of-document."""
    tok = model.cfg.tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, prompts, seed)
    dec = Decoder(model, tokens.shape[0], None, use_cache, tokens.shape[1] + max_new_tokens, cache, graphs)
    dec.feed(tokens, flow_x, image_mask, pad, vlm_x)
    logits = dec.next_logits()
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    banned = [tok.image_id, tok.pad_id]
    for _ in range(max_new_tokens):
        logits[:, banned] = float("-inf")
        nxt = sample_token(logits, temperature, gen)
        for r in range(len(prompts)):
            if not done[r]:
                out[r].append(int(nxt[r]))
                done[r] = int(nxt[r]) in (tok.eos_id, tok.boi_id)
        if bool(done.all()):
            break
        logits = _next(dec, nxt[:, None])
    return out


def _next(dec: Decoder, token: torch.Tensor) -> torch.Tensor:
    """Feed one token (R, 1) and return the next logits (R, V) (a copy: a graph's output is reused)."""
    return dec.text_step(token).clone()


@torch.no_grad()
def generate(model, prompt: Sequence[Segment], max_new_tokens: int = 64, temperature: float = 1.0,
             image_temperature: float = 1.0, guidance: float = 0.0, seed: int = 0, max_images: int = 4,
             method: str = "sequential", tol: float = 1e-4, max_iters: Optional[int] = None,
             graphs: Optional[bool] = None, cache: str = "static", chunk: int = 64) -> list:
    """Interleaved continuation of one prompt: returns a list of segments (token ids and images).
    `method`, `tol`, `max_iters`, `chunk`, `graphs` and `cache` as in sample_images, for every image."""
    tok = model.cfg.tokens
    N = model.cfg.fae.n_tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, [prompt], seed)
    rows = 1
    cond_keep = torch.ones(1, device=tokens.device)
    if guidance > 0:
        tokens, flow_x, image_mask, pad, vlm_x = (torch.cat([t, t]) for t in (tokens, flow_x, image_mask, pad, vlm_x))
        cond_keep = torch.tensor([1.0, 0.0], device=tokens.device)
    capacity = tokens.shape[1] + max_new_tokens + max_images * (N + 1)
    dec = Decoder(model, tokens.shape[0], cond_keep, capacity=capacity, cache=cache, graphs=graphs)
    dec.feed(tokens, flow_x, image_mask, pad, vlm_x)
    logits = dec.next_logits()
    out, n_images = [], 0
    budget = max_new_tokens
    R = dec.rows_total
    while budget > 0:
        logits = logits[:rows]
        logits[:, [tok.image_id, tok.pad_id] + ([tok.boi_id] if n_images >= max_images else [])] = float("-inf")
        nxt = int(sample_token(logits, temperature, gen)[0])
        out.append(nxt)
        budget -= 1
        logits = _next(dec, torch.full((R, 1), nxt, device=tokens.device))
        if nxt == tok.eos_id:
            break
        if nxt == tok.boi_id:
            y = sample_latents(dec, rows, guidance, image_temperature, gen, method=method, tol=tol,
                               max_iters=max_iters, chunk=chunk)
            out.append(finish_image(model, dec, rows, y, True, method, tol, max_iters, graphs, chunk)[0])
            n_images += 1
            logits = _next(dec, torch.full((R, 1), tok.eoi_id, device=tokens.device))
            out.append(tok.eoi_id)
    return out
