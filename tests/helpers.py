"""Shared test fixtures: tiny model configs and synthetic interleaved batches that follow the
batch contract of docs/DATA.md (text, image-start, N image slots, image-end, text, ...)."""
from __future__ import annotations

import torch

from megaflow.model.config import FlowConfig, ModelConfig, SpecialTokens, VLMConfig
from megaflow.model.fae import FAEConfig

VOCAB = 64
SPECIAL = SpecialTokens(pad_id=58, bos_id=59, eos_id=60, boi_id=61, eoi_id=62, image_id=63)


def tiny_config(tarflow_only: bool = False, adapter_input: str = "latent", **flow_overrides) -> ModelConfig:
    """A few-thousand-parameter STARFlow2: 4 VLM layers, 2 flow layers (r=2), 2 shallow blocks,
    8x8 grayscale pixels in 2x2 patches (16 latent tokens of 4 dims)."""
    flow = dict(dim=32, n_heads=4, ffn_dim=64, n_layers=2, ratio=2, n_shallow=2, shallow_layers=1,
                shallow_dim=16, shallow_heads=2)
    flow.update(flow_overrides)
    fae = FAEConfig(mode="pixels", image_size=8, channels=1, patch_size=2)
    if tarflow_only:
        flow["ratio"] = 0
        return ModelConfig(vlm=None, flow=FlowConfig(n_cond_tokens=VOCAB, **flow), fae=fae, tokens=SPECIAL)
    vlm = VLMConfig(vocab_size=VOCAB, dim=32, n_layers=flow["n_layers"] * flow["ratio"], n_heads=4,
                    n_kv_heads=2, ffn_dim=64)
    return ModelConfig(vlm=vlm, flow=FlowConfig(**flow), fae=fae, tokens=SPECIAL, adapter_input=adapter_input)


def make_batch(cfg: ModelConfig, batch_size: int = 2, seq_len: int = 48, max_images: int = 2,
               seed: int = 0, two_docs: bool = True) -> dict:
    """Row layout: [bos text.. boi img*N eoi text.. boi img*N eoi text.. eos] with the second image
    only in even rows, and (two_docs) a second packed document at the end of row 0."""
    g = torch.Generator().manual_seed(seed)
    t, N = cfg.tokens, cfg.fae.n_tokens
    C, H = cfg.fae.channels, cfg.fae.image_size
    B, T = batch_size, seq_len
    tokens = torch.full((B, T), t.pad_id, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    image_mask = torch.zeros(B, T, dtype=torch.bool)
    valid = torch.zeros(B, max_images, dtype=torch.bool)
    for b in range(B):
        seq, img = [t.bos_id], []
        n_img = max_images if b % 2 == 0 else 1
        for _ in range(n_img):
            seq += torch.randint(0, 50, (2,), generator=g).tolist()
            img += [False] * (len(seq) - len(img))
            seq += [t.boi_id] + [t.image_id] * N + [t.eoi_id]
            img += [False] + [True] * N + [False]
        seq += torch.randint(0, 50, (2,), generator=g).tolist() + [t.eos_id]
        img += [False] * (len(seq) - len(img))
        assert len(seq) <= T, "seq_len too short for this layout"
        L = len(seq)
        tokens[b, :L] = torch.tensor(seq)
        image_mask[b, :L] = torch.tensor(img)
        doc[b, :L] = 0
        pos[b, :L] = torch.arange(L)
        valid[b, :n_img] = True
        if two_docs and b == 0 and T - L >= 4:
            extra = [t.bos_id] + torch.randint(0, 50, (T - L - 2,), generator=g).tolist() + [t.eos_id]
            tokens[b, L:] = torch.tensor(extra)
            doc[b, L:] = 1
            pos[b, L:] = torch.arange(T - L)
    nxt = tokens.roll(-1, 1)
    targets = torch.where((doc == doc.roll(-1, 1)) & (doc >= 0) & ~image_mask.roll(-1, 1) & (nxt != t.pad_id), nxt, -100)
    targets[:, -1] = -100
    images = torch.rand(B, max_images, C, H, H, generator=g) * 2 - 1
    images[~valid] = 0
    return dict(tokens=tokens, targets=targets, position_ids=pos, doc_ids=doc, image_mask=image_mask,
                images=images, image_valid=valid)


def make_noise(cfg: ModelConfig, batch: dict, seed: int = 1) -> torch.Tensor:
    B, M = batch["image_valid"].shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, cfg.fae.n_tokens, cfg.fae.latent_dim, generator=g)
