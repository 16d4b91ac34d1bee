"""Generation: one KV-cached loop over an interleaved sequence.

Text tokens come from the LM head; after an image-start token the deep flow samples the image's
latent tokens one at a time (each goes straight into the KV cache of both streams), guided by
STARFlow's product-of-Gaussians rule; then the shallow flows run in reverse, one score-based
denoise step is taken through the flow itself, and the FAE decodes pixels. Text after the image
continues from the same cache. When the VLM reads FAE latents (model.adapter_input == "latent",
the default), the finished image's slots are re-encoded once, as one chunk of N positions, so that
the VLM's cache holds the image it will talk about (the flow stream's entries are recomputed from
the same inputs); with "flow" the sampled tokens are final as they are fed.

`Decoder(use_cache=False)` recomputes the whole prefix at every step: the slow reference that the
cached path is tested against. Rows are left-padded to a common length (padding is its own
document, so it is never attended to by real tokens).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from megaflow.model.flow import guided_params

Segment = Union[int, torch.Tensor]  # a token id, or an image (C, H, W) in [-1, 1]


class Decoder:
    """Incremental decoding state of `rows` sequences (tokens, latents, masks, KV cache)."""

    def __init__(self, model, rows: int, cond_keep: Optional[torch.Tensor] = None, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        dev = model.flow_in.weight.device
        D = model.cfg.fae.latent_dim
        self.tokens = torch.zeros(rows, 0, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, 0, dtype=torch.long, device=dev)
        self.doc = torch.zeros(rows, 0, dtype=torch.long, device=dev)
        self.image_mask = torch.zeros(rows, 0, dtype=torch.bool, device=dev)
        self.flow_x = torch.zeros(rows, 0, D, dtype=model.flow_in.weight.dtype, device=dev)
        self.vlm_x = torch.zeros_like(self.flow_x)  # FAE latents the adapter reads at image slots
        self.cond_keep = cond_keep if cond_keep is not None else torch.ones(rows, device=dev)
        self.cache = {} if use_cache else None
        self.last = None  # state tuple of the last fed position(s)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def feed(self, tokens: torch.Tensor, flow_x: Optional[torch.Tensor] = None,
             image_mask: Optional[torch.Tensor] = None, pad: Optional[torch.Tensor] = None,
             vlm_x: Optional[torch.Tensor] = None):
        """Append k positions to every row: tokens (R, k), flow_x (R, k, D), image_mask (R, k),
        pad (R, k) bool marks left padding, vlm_x (R, k, D) the FAE latents at image slots (when
        known). Runs the model on the new positions."""
        R, k = tokens.shape
        if flow_x is None:
            flow_x = self.flow_x.new_zeros(R, k, self.flow_x.shape[-1])
        if vlm_x is None:
            vlm_x = torch.zeros_like(flow_x)
        if image_mask is None:
            image_mask = torch.zeros_like(tokens, dtype=torch.bool)
        if pad is None:
            pad = torch.zeros_like(tokens, dtype=torch.bool)
        real_before = (self.doc >= 0).sum(1, keepdim=True)  # (R, 1)
        new_pos = real_before + (~pad).long().cumsum(1) - 1
        self.tokens = torch.cat([self.tokens, tokens], 1)
        self.pos = torch.cat([self.pos, new_pos.clamp(min=0)], 1)
        self.doc = torch.cat([self.doc, torch.where(pad, -1, 0)], 1)
        self.image_mask = torch.cat([self.image_mask, image_mask], 1)
        self.flow_x = torch.cat([self.flow_x, flow_x], 1)
        self.vlm_x = torch.cat([self.vlm_x, vlm_x.to(self.vlm_x)], 1)
        q = k if self.use_cache else self.length
        batch = {"tokens": self.tokens, "position_ids": self.pos, "image_mask": self.image_mask,
                 "doc_ids": self.doc if bool((self.doc < 0).any()) else None}
        ctx = self.model.context(batch, self.cond_keep, self.cache, q_len=q)
        chunk = {"tokens": self.tokens[:, -q:], "image_mask": self.image_mask[:, -q:]}
        state = self.model.embed(chunk, ctx, flow_x=self.flow_x[:, -q:], vlm_x=self.vlm_x[:, -q:])
        for unit in self.model.units.values():
            state = unit(state, ctx)
        self.last = tuple(t[:, -1:] if t.dim() == 3 else t for t in state)
        return self.last

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (state and KV cache)."""
        for name in ("tokens", "pos", "doc", "image_mask", "flow_x", "vlm_x"):
            setattr(self, name, getattr(self, name)[:, :length])
        if self.cache:
            for key, (k, v) in self.cache.items():
                self.cache[key] = (k[:, :, :length], v[:, :, :length])
        self.last = None

    def reencode_image(self, latents: torch.Tensor) -> None:
        """The last N positions are a finished image: give the VLM its FAE latents (N, D) or (R, N, D)
        and recompute those positions, so the cache holds what the VLM reads there (a no-op when the
        VLM reads the deep flow's own variable, which was final when fed)."""
        if self.model.cfg.adapter_input != "latent" or self.model.cfg.vlm is None:
            return
        N = latents.shape[-2]
        start = self.length - N
        tail = (self.tokens[:, start:], self.flow_x[:, start:], self.image_mask[:, start:])
        self.truncate(start)
        self.feed(*tail, vlm_x=latents.expand(self.tokens.shape[0], -1, -1))

    def next_logits(self) -> torch.Tensor:
        return self.model.vocab_gather(self.model.text_logits(self.last[0])[:, -1]).float()  # (R, V)

    def next_params(self):
        return self.model.flow_params(self.last[1])  # each (R, 1, D)


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


@torch.no_grad()
def sample_latents(dec: Decoder, rows: int, guidance: float, temperature: float, gen: torch.Generator,
                   z: Optional[torch.Tensor] = None):
    """Sample one image's N deep-flow latents, feeding each into the cache. `dec` holds `rows`
    conditional rows, followed by as many unconditional rows when guidance > 0. `z` (rows, N, D)
    gives the noise explicitly (the deep flow's inverse); by default it is drawn from `gen`.
    Returns y (rows, N, D), the deep flow's variable (before the shallow inverse)."""
    cfg = dec.model.cfg
    N, D, image_id = cfg.fae.n_tokens, cfg.fae.latent_dim, cfg.tokens.image_id
    ys = []
    for i in range(N):
        mu, sigma = dec.next_params()  # (R, 1, D)
        if guidance > 0:
            mu, sigma = guided_params(mu[:rows], sigma[:rows], mu[rows:], sigma[rows:], guidance)
        zi = z[:, i:i + 1].to(mu) if z is not None else torch.randn(rows, 1, D, generator=gen).to(mu)
        y = mu + temperature * sigma * zi  # (rows, 1, D)
        ys.append(y)
        both = torch.cat([y, y]) if guidance > 0 else y
        R = both.shape[0]
        dec.feed(torch.full((R, 1), image_id, device=y.device), both, torch.ones(R, 1, dtype=torch.bool, device=y.device))
    return torch.cat(ys, dim=1)


def denoise(model, dec: Decoder, rows: int, start: int, latents: torch.Tensor) -> torch.Tensor:
    """One score step x <- x + sigma_noise^2 * grad_x log p(x), through the shallow flows and the
    deep flow in the context of the first `rows` rows of `dec`, whose image slots start at `start`."""
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


def finish_image(model, dec: Decoder, rows: int, y: torch.Tensor, do_denoise: bool = True) -> torch.Tensor:
    """Deep-flow latents (rows, N, D) -> pixels (rows, C, H, W) in [-1, 1]; the decoder's image
    slots are re-encoded with the final latents (the unconditional guidance rows get the same)."""
    N = y.shape[1]
    x = model.shallow.inverse(y)
    if do_denoise:
        x = denoise(model, dec, rows, dec.length - N, x)
    dec.reencode_image(x.repeat(dec.tokens.shape[0] // rows, 1, 1))
    return model.fae.decode(x).clamp(-1, 1)


@torch.no_grad()
def sample_images(model, prompts: Sequence[Sequence[Segment]], guidance: float = 0.0, temperature: float = 1.0,
                  seed: int = 0, use_cache: bool = True, do_denoise: bool = True):
    """Text (or interleaved) prompts -> one image each: image-start is appended to every prompt.
    Returns (images (R, C, H, W), the decoder positioned after the image's last latent)."""
    tok = model.cfg.tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompts = [list(p) + [tok.boi_id] for p in prompts]
    R = len(prompts)
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, prompts, seed)
    cond_keep = torch.ones(R, device=tokens.device)
    if guidance > 0:
        tokens, flow_x, image_mask, pad, vlm_x = (torch.cat([t, t]) for t in (tokens, flow_x, image_mask, pad, vlm_x))
        cond_keep = torch.cat([cond_keep, torch.zeros_like(cond_keep)])
    dec = Decoder(model, tokens.shape[0], cond_keep, use_cache)
    dec.feed(tokens, flow_x, image_mask, pad, vlm_x)
    y = sample_latents(dec, R, guidance, temperature, gen)
    return finish_image(model, dec, R, y, do_denoise), dec


@torch.no_grad()
def sample_text(model, prompts: Sequence[Sequence[Segment]], max_new_tokens: int = 32, temperature: float = 0.0,
                seed: int = 0, use_cache: bool = True) -> list:
    """Prompts (text and images) -> generated token ids per row, stopping at end-of-document."""
    tok = model.cfg.tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, prompts, seed)
    dec = Decoder(model, tokens.shape[0], None, use_cache)
    dec.feed(tokens, flow_x, image_mask, pad, vlm_x)
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    banned = [tok.image_id, tok.pad_id]
    for _ in range(max_new_tokens):
        logits = dec.next_logits()
        logits[:, banned] = float("-inf")
        nxt = sample_token(logits, temperature, gen)
        for r in range(len(prompts)):
            if not done[r]:
                out[r].append(int(nxt[r]))
                done[r] = int(nxt[r]) in (tok.eos_id, tok.boi_id)
        if bool(done.all()):
            break
        dec.feed(nxt[:, None])
    return out


@torch.no_grad()
def generate(model, prompt: Sequence[Segment], max_new_tokens: int = 64, temperature: float = 1.0,
             image_temperature: float = 1.0, guidance: float = 0.0, seed: int = 0, max_images: int = 4) -> list:
    """Interleaved continuation of one prompt: returns a list of segments (token ids and images)."""
    tok = model.cfg.tokens
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens, flow_x, image_mask, pad, vlm_x = prompt_tensors(model, [prompt], seed)
    rows = 1
    cond_keep = torch.ones(1, device=tokens.device)
    if guidance > 0:
        tokens, flow_x, image_mask, pad, vlm_x = (torch.cat([t, t]) for t in (tokens, flow_x, image_mask, pad, vlm_x))
        cond_keep = torch.tensor([1.0, 0.0], device=tokens.device)
    dec = Decoder(model, tokens.shape[0], cond_keep)
    dec.feed(tokens, flow_x, image_mask, pad, vlm_x)
    out, n_images = [], 0
    budget = max_new_tokens
    while budget > 0:
        logits = dec.next_logits()[:rows]
        logits[:, [tok.image_id, tok.pad_id] + ([tok.boi_id] if n_images >= max_images else [])] = float("-inf")
        nxt = int(sample_token(logits, temperature, gen)[0])
        out.append(nxt)
        budget -= 1
        dec.feed(torch.full((dec.tokens.shape[0], 1), nxt, device=tokens.device))
        if nxt == tok.eos_id:
            break
        if nxt == tok.boi_id:
            y = sample_latents(dec, rows, guidance, image_temperature, gen)
            out.append(finish_image(model, dec, rows, y)[0])
            n_images += 1
            dec.feed(torch.full((dec.tokens.shape[0], 1), tok.eoi_id, device=tokens.device))
            out.append(tok.eoi_id)
    return out
