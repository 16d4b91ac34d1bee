"""STARFlow2: a VLM stream and a deep TarFlow stream, interleaved in depth under one causal mask.

Read top to bottom: the batch contract, the Pretzel unit, the model (embed -> units -> heads), and
the losses. The forward is a plain loop over `self.units` (an ordered ModuleDict), and the state
passed between units is a fixed tuple `(h_vlm, h_flow, flow_x, flow_aux)`:
  h_vlm   (B, T, Dv)  VLM stream hidden states (width 0 for a TarFlow-only model)
  h_flow  (B, T, Df)  flow stream hidden states
  flow_x  (B, T, D)   the deep flow's input variable at image slots (the shallow flows' output), 0 elsewhere
  flow_aux (B, 2)     per-row sums of the shallow flows' log|det| and of their latent-norm penalty
so a pipeline stage boundary carries exactly that tuple. The sequence-level context (masks, RoPE
tables, caches) is rebuilt from the batch by every stage (`context`).

Deep flow convention: the flow head at position p gives (mu, sigma) for the latent at p+1 when p+1
is an image slot; the image-start position carries a learned start token in the flow stream.

What the VLM reads at image slots (`cfg.adapter_input`): "latent" (default, the design's choice) is
the FAE latent itself, which is what understanding needs; since a latent token depends on the whole
image's deep-flow variables (the shallow flows mix an image's tokens), the VLM -> flow skip is then
off at image slots, so the deep flow's prediction of token p+1 never sees tokens >= p+1 and the
likelihood stays exact; text conditions the image through the flow stream's attention to earlier
positions. Generation re-encodes a finished image's slots once (generate.py). "flow" reads the deep
flow's own variable y, which is causal token by token, so the skip stays on everywhere and a
generated image needs no re-encoding, but the VLM must read images through the shallow flows.
No rank logic here; tensor parallelism swaps layers from outside (parallel/).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaflow.model.config import ModelConfig
from megaflow.model.fae import FAE, dequantize
from megaflow.model.flow import ShallowFlows, at_least_fp32, gaussian_params
from megaflow.model.layers import AttnContext, RMSNorm, TransformerBlock, rope_tables
from megaflow.model.masks import document_mask

BATCH_KEYS = ("tokens", "targets", "position_ids", "doc_ids", "image_mask", "images", "image_valid")


@dataclass
class StepContext:
    """Per-forward context shared by all units: attention contexts of both streams and masks."""
    vlm: Optional[AttnContext]
    flow: AttnContext
    image_mask: torch.Tensor  # (B, T, 1) float, 1 at image slots of the residual stream's positions (seq_split)
    cond_gate: torch.Tensor  # (B, 1, 1) float, 0 where the condition is dropped (guidance)
    vlm_skip: torch.Tensor  # (B, T or 1, 1) float gate of the VLM -> flow skip: cond_gate, and 0 at image
    #                         slots when the VLM reads the FAE latent there (model docstring)


def scatter_images(values: torch.Tensor, valid: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """values (B, M, N, D) per image slot of the batch -> (B, T, D): the k-th image position of row b
    (in sequence order) takes token k % N of the (k // N)-th valid image of row b; zeros elsewhere.
    What `masked_scatter(image_mask, values[valid])` gives for batches that keep the contract (N
    image positions per valid image), without boolean indexing, which reads `valid` back."""
    B, M, N, _ = values.shape
    k = image_mask.long().cumsum(1) - 1  # (B, T) image position within the row
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # (B, M) valid images first
    m = order.gather(1, (k // N).clamp(0, M - 1))  # (B, T)
    rows = torch.arange(B, device=values.device)[:, None]
    out = values[rows, m, k.clamp(min=0) % N]  # (B, T, D)
    return torch.where(image_mask[..., None], out, out.new_zeros(()))


class PretzelUnit(nn.Module):
    """r VLM layers, then one flow layer, joined by zero-initialised skips (W_vlm, W_d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v, f = cfg.vlm, cfg.flow
        self.vlm_layers = nn.ModuleList()
        if v is not None:
            self.vlm_layers.extend(
                TransformerBlock(v.dim, v.n_heads, v.n_kv_heads, v.hd, v.ffn_dim, v.norm_eps, v.qkv_bias)
                for _ in range(f.ratio))
        self.flow_layer = TransformerBlock(f.dim, f.n_heads, f.n_heads, f.dim // f.n_heads, f.ffn_dim, f.norm_eps)
        self.w_vlm = nn.Linear(v.dim, f.dim, bias=False) if v is not None and f.skip_vlm_to_flow else None
        self.w_d = nn.Linear(f.dim, v.dim, bias=False) if v is not None and f.skip_flow_to_vlm else None

    def forward(self, state: tuple, ctx: StepContext) -> tuple:
        h_vlm, h_flow, flow_x, flow_aux = state
        for layer in self.vlm_layers:
            h_vlm = layer(h_vlm, ctx.vlm)
        if self.w_vlm is not None:
            h_flow = h_flow + ctx.vlm_skip * self.w_vlm(h_vlm)  # (B, T, Df)
        h_flow = self.flow_layer(h_flow, ctx.flow)
        if self.w_d is not None:
            h_vlm = h_vlm + ctx.image_mask * self.w_d(h_flow)  # (B, T, Dv), image slots only
        return h_vlm, h_flow, flow_x, flow_aux

    def init_weights(self, vlm_std: float, vlm_out_std: float, flow_std: float, flow_out_std: float):
        for layer in self.vlm_layers:
            layer.init_weights(vlm_std, vlm_out_std)
        self.flow_layer.init_weights(flow_std, flow_out_std)
        for skip in (self.w_vlm, self.w_d):
            if skip is not None:
                nn.init.zeros_(skip.weight)


class TextLoss(nn.Module):
    """Summed cross-entropy over targets != -100. A module so that tensor parallelism can swap in a
    vocab-parallel version that never gathers the full-vocabulary logits."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


class STARFlow2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        v, f = cfg.vlm, cfg.flow
        self.fae = FAE(cfg.fae)
        D = cfg.fae.latent_dim
        self.shallow = ShallowFlows(f.n_shallow, D, cfg.fae.n_tokens, f.shallow_dim, f.shallow_heads,
                                    f.shallow_layers, f.clip, f.norm_eps, f.shallow_ffn_dim)
        if v is not None:
            self.embed_tokens = nn.Embedding(v.vocab_size, v.dim)
            self.adapter = nn.Sequential(nn.Linear(D, v.dim), nn.GELU(), nn.Linear(v.dim, v.dim))
            self.flow_embed = None
        else:  # TarFlow-only: the flow stream embeds the conditioning tokens itself
            self.embed_tokens = self.adapter = None
            self.flow_embed = nn.Embedding(cfg.vocab_size, f.dim)
        self.flow_in = nn.Linear(D, f.dim)
        self.flow_start = nn.Parameter(torch.empty(f.dim))
        self.units = nn.ModuleDict({str(k): PretzelUnit(cfg) for k in range(f.n_layers)})
        self.norm = RMSNorm(v.dim, v.norm_eps) if v is not None else None
        self.lm_head = nn.Linear(v.dim, v.vocab_size, bias=False) if v is not None else None
        self.flow_norm = RMSNorm(f.dim, f.norm_eps)
        self.gauss_head = nn.Linear(f.dim, 2 * D)
        self.text_loss = TextLoss()
        # Layout hooks, identities here: sequence parallelism (parallel/) swaps in a split that keeps
        # this rank's slice of T of the residual stream; a vocab-parallel lm_head swaps in a gather
        # of the logits for sampling (the loss reads sharded logits).
        self.seq_split = nn.Identity()
        self.vocab_gather = nn.Identity()
        self.tie_weights()

    # ----- build helpers -------------------------------------------------------------------------
    def tie_weights(self):
        if self.cfg.vlm is not None and self.cfg.vlm.tie_embeddings and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (after a meta-device build + `to_empty`). Skips, the adapter's
        output layer and the Gaussian head start at zero: the model starts as the VLM plus an
        unconditional identity flow."""
        v, f = self.cfg.vlm, self.cfg.flow
        self.tie_weights()
        std = 0.02
        n_vlm = max(v.n_layers, 1) if v is not None else 1
        for unit in self.units.values():
            unit.init_weights(std, std / math.sqrt(2 * n_vlm), std, std / math.sqrt(2 * f.n_layers))
        if self.embed_tokens is not None:
            nn.init.normal_(self.embed_tokens.weight, std=std)
            nn.init.normal_(self.adapter[0].weight, std=std)
            nn.init.zeros_(self.adapter[0].bias)
            nn.init.zeros_(self.adapter[2].weight)
            nn.init.zeros_(self.adapter[2].bias)
            self.norm.init_weights()
            if not v.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=std)
        if self.flow_embed is not None:
            nn.init.normal_(self.flow_embed.weight, std=std)
        nn.init.normal_(self.flow_in.weight, std=std)
        nn.init.zeros_(self.flow_in.bias)
        nn.init.normal_(self.flow_start, std=std)
        self.flow_norm.init_weights()
        nn.init.zeros_(self.gauss_head.weight)
        nn.init.zeros_(self.gauss_head.bias)
        self.shallow.init_weights()
        self.fae.init_weights()

    # ----- forward pieces (each pipeline stage calls the ones it owns) -------------------------------
    def context(self, batch: dict, cond_keep: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                q_len: Optional[int] = None) -> StepContext:
        """Masks and RoPE tables for this batch. With a cache, the batch's position_ids/doc_ids
        cover all positions seen so far and the forward covers the last `q_len` of them."""
        pos, tokens = batch["position_ids"], batch["tokens"]
        T = tokens.shape[1]
        q_len = q_len or T
        mask = document_mask(batch.get("doc_ids"), q_len, T, tokens.device, self.cfg.mask_block)  # one per batch
        pos_q = pos[:, T - q_len:]
        v, f = self.cfg.vlm, self.cfg.flow
        dtype = self.flow_in.weight.dtype
        vlm_ctx = AttnContext(*rope_tables(pos_q, v.hd, v.rope_theta, dtype), mask, cache) if v is not None else None
        flow_ctx = AttnContext(*rope_tables(pos_q, f.dim // f.n_heads, f.rope_theta, dtype), mask, cache)
        image_mask = self.seq_split(batch["image_mask"][:, T - q_len:, None].to(dtype))
        if cond_keep is None:
            cond_keep = torch.ones(tokens.shape[0], device=tokens.device)
        cond_gate = cond_keep.to(dtype).view(-1, 1, 1)
        vlm_skip = cond_gate * (1.0 - image_mask) if self.cfg.adapter_input == "latent" else cond_gate
        return StepContext(vlm_ctx, flow_ctx, image_mask, cond_gate, vlm_skip)

    def encode_images(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """images (B, M, C, H, W) -> shallow-flow output y (B, M, N, D), log|det| (B, M), penalty (B, M)
        and the (noised) FAE latent (B, M, N, D). `noise` (B, M, N, D), the training input noise as
        flow.dequantization says: 'gaussian': standard normal, scaled by flow.noise_std; 'uniform':
        u ~ U[0, 1) of TarFlow's dequantisation of the 8-bit pixels (fae.dequantize)."""
        B, M = images.shape[:2]
        with torch.no_grad():
            lat = self.fae.encode(images.flatten(0, 1))  # (B*M, N, D)
        lat = lat.view(B, M, *lat.shape[1:])  # (B, M, N, D)
        if noise is not None and self.cfg.flow.dequantization == "uniform":
            lat = dequantize(lat, noise)
        elif noise is not None:
            lat = lat + self.cfg.flow.noise_std * noise
        y, logdet, sq = self.shallow(lat.flatten(0, 1))
        return y.view_as(lat), logdet.view(B, M), sq.view(B, M), lat

    def embed(self, batch: dict, ctx: StepContext, noise: Optional[torch.Tensor] = None,
              flow_x: Optional[torch.Tensor] = None, vlm_x: Optional[torch.Tensor] = None) -> tuple:
        """First-stage work: images -> shallow flows -> deep-flow inputs at image slots; token and
        adapter embeddings (VLM stream); flow-stream inputs. `flow_x` (B, T, D) may be given directly
        (generation feeds its own samples) instead of `images`, with `vlm_x` (B, T, D), the FAE latents
        the adapter reads at image slots when cfg.adapter_input == "latent" (zeros when not given:
        the slots of an image still being sampled, which the flow stream does not read)."""
        tokens = batch["tokens"]
        B, T = tokens.shape
        D = self.cfg.fae.latent_dim
        act = self.flow_in.weight.dtype  # the streams' dtype; the flow variables and log-dets stay fp32
        wide = torch.promote_types(act, torch.float32)
        flow_aux = torch.zeros(B, 2, dtype=wide, device=tokens.device)
        if flow_x is None:
            flow_x = torch.zeros(B, T, D, dtype=wide, device=tokens.device)
            vlm_x = flow_x
            valid = batch["image_valid"]
            if valid.shape[1]:  # a shape test, not a read-back of `valid`: the step never waits for the GPU
                y, logdet, sq, lat = self.encode_images(batch["images"], noise)
                flow_x = scatter_images(y.to(wide), valid, batch["image_mask"])  # (B, T, D)
                vlm_x = scatter_images(lat.to(wide), valid, batch["image_mask"])  # (B, T, D)
                flow_aux = torch.stack([(logdet * valid).sum(1), (sq * valid).sum(1)], dim=1).to(wide)  # (B, 2)
        elif vlm_x is None:
            vlm_x = torch.zeros_like(flow_x)
        image_mask = batch["image_mask"][..., None].to(act)  # (B, T, 1)
        start = (tokens == self.cfg.tokens.boi_id)[..., None].to(act)  # (B, T, 1)
        h_flow = image_mask * self.flow_in(flow_x.to(act)) + start * self.flow_start  # (B, T, Df)
        if self.embed_tokens is not None:
            seen = vlm_x if self.cfg.adapter_input == "latent" else flow_x
            h_vlm = self.embed_tokens(tokens) + image_mask * self.adapter(seen.to(act))  # (B, T, Dv)
        else:
            text = 1.0 - image_mask - start
            h_flow = h_flow + ctx.cond_gate * text * self.flow_embed(tokens)
            h_vlm = flow_x.new_zeros(B, T, 0)
        return self.seq_split(h_vlm), self.seq_split(h_flow), flow_x, flow_aux

    def text_logits(self, h_vlm: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_vlm))  # (B, T, V)

    def flow_params(self, h_flow: torch.Tensor):
        """(mu, sigma) for the latent at the NEXT position, each (B, T, D)."""
        return gaussian_params(at_least_fp32(self.gauss_head(self.flow_norm(h_flow))), self.cfg.flow.clip)

    def deep_forward(self, h_flow: torch.Tensor, flow_x: torch.Tensor, image_mask: torch.Tensor):
        """The deep flow block, data -> noise: z (B, T-1, D) for the latent at positions 1..T-1,
        log sigma (B, T-1, D), and the mask (B, T-1, 1) of positions that are image slots."""
        mu, sigma = self.flow_params(h_flow)
        pred = image_mask[:, 1:, None].to(mu.dtype)  # position p predicts the latent at p+1
        z = (flow_x[:, 1:] - mu[:, :-1]) / sigma[:, :-1]  # (B, T-1, D)
        return z * pred, sigma[:, :-1].log(), pred

    def loss_terms(self, state: tuple, batch: dict) -> dict:
        """Last-stage work: summed losses and their counts (so micro-batches and data-parallel
        ranks can be normalised by global counts)."""
        h_vlm, h_flow, flow_x, flow_aux = state
        D = self.cfg.fae.latent_dim
        terms = {}
        if self.lm_head is not None:
            terms["text_sum"] = self.text_loss(self.text_logits(h_vlm), batch["targets"])
        z, log_sigma, pred = self.deep_forward(h_flow, flow_x, batch["image_mask"])
        deep_logdet = -(log_sigma * pred).sum()
        gauss = 0.5 * (z.pow(2) * pred).sum() + 0.5 * math.log(2 * math.pi) * D * pred.sum()
        terms["flow_sum"] = gauss - deep_logdet - flow_aux[:, 0].sum()  # nats, summed over dims
        terms["z_sq_sum"] = 0.5 * (z.pow(2) * pred).sum()
        terms["penalty_sum"] = flow_aux[:, 1].sum()
        return terms

    def loss_counts(self, batch: dict) -> dict:
        """Normalisers from the batch alone (computable before any forward)."""
        return {"text": (batch["targets"] != -100).sum(), "dims": batch["image_mask"].sum() * self.cfg.fae.latent_dim,
                "images": batch["image_valid"].sum()}

    def combine(self, terms: dict, counts: dict) -> torch.Tensor:
        w = self.cfg.loss
        loss = w.w_img * terms["flow_sum"] / counts["dims"].clamp(min=1)
        loss = loss + w.w_latent_norm * terms["penalty_sum"] / counts["images"].clamp(min=1)
        if "text_sum" in terms:
            loss = loss + w.w_text * terms["text_sum"] / counts["text"].clamp(min=1)
        return loss

    def terms(self, batch: dict, noise: Optional[torch.Tensor] = None,
              cond_keep: Optional[torch.Tensor] = None) -> dict:
        """Whole model in one process: embed -> every unit -> the summed loss terms (`loss_terms`)."""
        ctx = self.context(batch, cond_keep)
        state = self.embed(batch, ctx, noise)
        for unit in self.units.values():
            state = unit(state, ctx)
        return self.loss_terms(state, batch)

    def forward(self, batch: dict, noise: Optional[torch.Tensor] = None, cond_keep: Optional[torch.Tensor] = None):
        """Whole model in one process: returns (loss, metrics)."""
        terms = self.terms(batch, noise, cond_keep)
        counts = self.loss_counts(batch)
        return self.combine(terms, counts), metrics_from(terms, counts, self.cfg)


def bits_per_dim(nll_per_dim: float, pixels: bool) -> float:
    """Nats per dimension -> bits per dimension; for 8-bit pixels scaled to [-1, 1] a bin is 1/128
    wide, so the discrete NLL adds log(128) per dimension (TarFlow's convention). On TarFlow's scale
    only when the NLL is of uniformly dequantised pixels (flow.dequantization='uniform', or
    megaflow.train.evaluate's bits_per_dim_tarflow); under Gaussian input noise it is a continuous
    NLL (floor ~4.73 for sigma 0.05)."""
    return (nll_per_dim + (math.log(128.0) if pixels else 0.0)) / math.log(2.0)


METRIC_COUNTS = {"flow_nll": 0, "bits_per_dim": 0, "text_loss": 1}  # which count of "_counted" each needs


@torch.no_grad()
def metric_tensors(terms: dict, counts: dict, cfg: ModelConfig) -> dict:
    """The step's derived metrics as 0-d tensors, nothing read back (a training step does not wait
    for the GPU): flow_nll, bits_per_dim and, with a VLM, text_loss; "_counted" (2,) says whether
    the batch had image dims and text targets to count. `read_metrics` turns them into floats."""
    dims, text = (torch.as_tensor(counts[k]) for k in ("dims", "text"))
    flow_sum = torch.as_tensor(terms["flow_sum"]).detach().double()
    nll = flow_sum / dims.to(flow_sum.device).clamp(min=1)
    out = {"flow_nll": nll, "bits_per_dim": bits_per_dim(nll, cfg.fae.mode == "pixels"),
           "_counted": torch.stack([dims > 0, text > 0]).to(nll.device)}
    if "text_sum" in terms:
        text_sum = torch.as_tensor(terms["text_sum"]).detach().double()
        out["text_loss"] = text_sum / text.to(text_sum.device).clamp(min=1)
    return out


def read_metrics(metrics: dict) -> dict:
    """Floats of step metrics (metric_tensors' or already floats; read back here, at once): a derived
    metric is left out when the batch had nothing to count for it, and kept, NaN included, when it
    had (a NaN loss is reported, never dropped)."""
    counted = metrics.get("_counted")
    counted = torch.as_tensor(counted).tolist() if counted is not None else None
    out = {}
    for k, v in metrics.items():
        if k == "_counted" or (counted is not None and k in METRIC_COUNTS and not counted[METRIC_COUNTS[k]]):
            continue
        out[k] = float(v)
    return out


def metrics_from(terms: dict, counts: dict, cfg: ModelConfig) -> dict:
    """metric_tensors as floats (read back now)."""
    return read_metrics(metric_tensors(terms, counts, cfg))


# ----- curriculum: which parameters train in each stage -------------------------------------------
def param_group(name: str) -> str:
    """Group of a parameter name: vlm, adapter, flow, couple_in, couple_out or fae."""
    if name.startswith("fae."):
        return "fae"
    if name.startswith("adapter."):
        return "adapter"
    if ".w_vlm." in name:
        return "couple_in"
    if ".w_d." in name:
        return "couple_out"
    if name.startswith(("embed_tokens.", "norm.", "lm_head.")) or ".vlm_layers." in name:
        return "vlm"
    return "flow"


STAGE_GROUPS = {
    "t2i": {"flow", "couple_in"},
    "i2t": {"adapter"},
    "joint": {"flow", "couple_in", "couple_out", "adapter"},
    "all": {"vlm", "flow", "couple_in", "couple_out", "adapter"},
}


def apply_stage(model: nn.Module, stage: str) -> list:
    """Set requires_grad by curriculum stage; returns the names of trainable parameters.
    The FAE never trains here (it has its own entry point, megaflow/model/fae_train.py)."""
    if stage not in STAGE_GROUPS:
        raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_GROUPS)}")
    groups, names = STAGE_GROUPS[stage], []
    for name, p in model.named_parameters():
        p.requires_grad_(param_group(name) in groups)
        if p.requires_grad:
            names.append(name)
    return names


def build_model(cfg: ModelConfig, device="cpu", seed: int = 0) -> STARFlow2:
    """Meta-device build, then materialise on `device` and initialise with `seed`."""
    with torch.device("meta"):
        model = STARFlow2(cfg)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    apply_stage(model, cfg.stage)
    return model
