"""The image latent space: FAE (feature auto-encoder) and its 'pixels' special case.

What it does:
- `patchify` / `unpatchify`: image (B, C, H, W) <-> patch tokens (B, N, p*p*C), raster order of
  patches, channel-last inside a patch. Exactly invertible; the rest of the model reuses them.
- `FAEConfig` and `FAE`. Mode 'pixels': latent = patchified image (TarFlow), no parameters.
  Mode 'fae': a frozen pluggable encoder gives patch features (B, N, encoder_dim); ONE pre-norm
  residual self-attention layer plus a linear layer compress each patch to C latent channels; a
  feature decoder (a few transformer layers) maps latents back to encoder features and a pixel
  decoder (per-patch MLP + unpatchify) maps features to pixels. `FAE.loss` is the FAE's own
  reconstruction objective.
- Encoders: 'conv' (a small patch/conv encoder the project trains itself, for offline demos) or
  'hf:<local dir>' (a Hugging Face DINOv2/SigLIP vision checkpoint, read from that directory only).

Training recipe for the 'conv' encoder: it trains jointly with the compression layer and both
decoders in the FAE's own phase (`fae_train.py`). Its features are the feature-reconstruction
target through a stop-gradient, and they end in a non-affine LayerNorm so that the target cannot
collapse to zero; the encoder itself learns only through the pixel loss. "Frozen" is its state
once STARFlow2 trains (its curriculum never trains the 'fae' group). An 'hf:' encoder is frozen
from the start. A STARFlow2 run starts from a trained FAE with `fae.checkpoint` (`FAE.load_trained`,
called by megaflow.train.build; the run's own checkpoints then carry the FAE's weights).

What it does not do: data loading, the training loop, writing FAE files (see `fae_train.py`), or
anything about ranks. Model code here is pure torch; transformers is imported lazily for 'hf:'.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("pixels", "fae")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class FAEConfig:
    """The image latent space: patchified pixels, or FAE latents of a frozen visual encoder."""
    mode: str = "pixels"  # 'pixels' (latent = patchified image, exact) or 'fae' (learned latents)
    image_size: int = 32  # side of the square input images, in pixels
    channels: int = 1  # image channels: 1 (grayscale) or 3 (RGB)
    patch_size: int = 4  # side of a square patch; one latent token per patch
    latent_channels: int = 8  # C: latent channels per patch in 'fae' mode (32 in the paper)
    encoder: str = "conv"  # 'conv' (small encoder trained by the project) or 'hf:<local checkpoint dir>'
    encoder_dim: int = 64  # width of the encoder's patch features (must match an hf checkpoint's hidden size)
    n_heads: int = 4  # attention heads of the compression layer and the feature decoder
    decoder_dim: int = 64  # width of the feature decoder's transformer layers
    decoder_layers: int = 2  # transformer layers in the feature decoder
    latent_penalty: float = 1e-3  # weight of mean(latent^2) in the FAE loss, keeps the latent scale bounded
    latent_noise: float = 0.0  # std of Gaussian noise added to latents before decoding, in training only
    checkpoint: str = ""  # a trained FAE file (`megaflow fae --out`) a STARFlow2 run starts from (frozen); '' = random init

    def __post_init__(self):
        _check(self.mode in MODES, f"fae.mode={self.mode!r} is not one of {MODES}")
        _check(self.channels in (1, 3), f"fae.channels={self.channels} must be 1 or 3")
        _check(self.patch_size > 0, f"fae.patch_size={self.patch_size} must be positive")
        _check(self.image_size > 0 and self.image_size % self.patch_size == 0,
               f"fae.image_size={self.image_size} must be a positive multiple of fae.patch_size={self.patch_size}")
        _check(not self.checkpoint or self.mode == "fae",
               f"fae.checkpoint={self.checkpoint!r} needs fae.mode='fae' (pixels have no weights)")
        if self.mode == "pixels":
            return
        _check(self.encoder == "conv" or (self.encoder.startswith("hf:") and len(self.encoder) > 3),
               f"fae.encoder={self.encoder!r} must be 'conv' or 'hf:<local checkpoint dir>'")
        for name in ("latent_channels", "encoder_dim", "n_heads", "decoder_dim", "decoder_layers"):
            _check(getattr(self, name) > 0, f"fae.{name}={getattr(self, name)} must be positive")
        _check(self.encoder_dim % self.n_heads == 0,
               f"fae.encoder_dim={self.encoder_dim} is not divisible by fae.n_heads={self.n_heads}")
        _check(self.decoder_dim % self.n_heads == 0,
               f"fae.decoder_dim={self.decoder_dim} is not divisible by fae.n_heads={self.n_heads}")
        _check(self.latent_penalty >= 0, f"fae.latent_penalty={self.latent_penalty} must be >= 0")
        _check(self.latent_noise >= 0, f"fae.latent_noise={self.latent_noise} must be >= 0")

    @property
    def latent_dim(self) -> int:
        """Channels of one latent token: C in 'fae' mode, p*p*channels in 'pixels' mode."""
        return self.latent_channels if self.mode == "fae" else self.patch_size ** 2 * self.channels

    @property
    def n_tokens(self) -> int:
        """Latent tokens per image: one per patch."""
        return (self.image_size // self.patch_size) ** 2


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): patches in raster order, channel-last inside a patch."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) for a square grid of N patches; the inverse of `patchify`."""
    B, N, _ = tokens.shape
    g, p = math.isqrt(N), patch_size
    _check(g * g == N, f"unpatchify needs a square number of patches, got N={N}")
    x = tokens.reshape(B, g, g, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, channels, g * p, g * p)  # (B, C, H, W)


def dequantize(pixels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Uniform dequantisation of 8-bit data (TarFlow's): values p / 127.5 - 1 of integer pixels p in
    0..255 (the data pipeline's scaling) -> (p + u) / 128 - 1, with u in [0, 1) of the same shape.
    Elementwise, so it applies to patchified pixels ('pixels' latents) as well as to images. The
    density of the result on [-1, 1) times 128 per dimension is the probability of the 8-bit value."""
    p = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255)
    return ((p + u.float()) / 128.0 - 1.0).to(pixels.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention over the patches of one image."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ConvEncoder(nn.Module):
    """The project's own small encoder: patch-embedding conv + a 3x3 residual conv, normalised."""

    def __init__(self, cfg: FAEConfig):
        super().__init__()
        self.embed = nn.Conv2d(cfg.channels, cfg.encoder_dim, cfg.patch_size, stride=cfg.patch_size)
        self.mix = nn.Conv2d(cfg.encoder_dim, cfg.encoder_dim, 3, padding=1)
        self.norm = nn.LayerNorm(cfg.encoder_dim, elementwise_affine=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.embed(images))  # (B, E, H/p, W/p)
        h = h + self.mix(h)
        return self.norm(h.flatten(2).transpose(1, 2))  # (B, N, E)


class HFEncoder(nn.Module):
    """A frozen Hugging Face DINOv2/SigLIP vision model read from a local directory only.

    Construction builds the architecture from the directory's config.json alone, so a meta-device
    build reads no weights; `load_pretrained` reads them (FAE.init_weights calls it, so every build
    path, one process or each pipeline stage that holds the encoder, ends with the checkpoint's
    weights after `to_empty`). Patch tokens are the last N tokens of `last_hidden_state` (this
    drops the CLS and register tokens of DINOv2).
    """

    def __init__(self, cfg: FAEConfig):
        super().__init__()
        self.path = cfg.encoder[len("hf:"):]
        if not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"fae.encoder={cfg.encoder!r}: no checkpoint directory at {self.path!r}. Point it at a local "
                f"Hugging Face DINOv2/SigLIP vision checkpoint (nothing is downloaded), or use fae.encoder='conv'.")
        from transformers import AutoConfig, AutoModel  # lazy: only this encoder needs transformers
        model = AutoModel.from_config(AutoConfig.from_pretrained(self.path, local_files_only=True))
        self.model = getattr(model, "vision_model", model)  # SigLIP's vision model wraps its transformer
        hcfg = self.model.config
        _check(hcfg.hidden_size == cfg.encoder_dim,
               f"fae.encoder_dim={cfg.encoder_dim} must equal the checkpoint's hidden_size={hcfg.hidden_size}")
        _check(hcfg.patch_size == cfg.patch_size,
               f"fae.patch_size={cfg.patch_size} must equal the checkpoint's patch_size={hcfg.patch_size}")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        pre = os.path.join(self.path, "preprocessor_config.json")
        if os.path.exists(pre):
            with open(pre) as f:
                pp = json.load(f)
            mean, std = pp.get("image_mean", mean), pp.get("image_std", std)
        self.mean, self.std = tuple(mean), tuple(std)  # plain floats: nothing for to_empty to wipe
        self.n_tokens = cfg.n_tokens
        # Buffers the checkpoint does not save (SigLIP's position ids) are made persistent: a model
        # rebuilt on meta and loaded from our state dict (sample grids, inference) then gets them too.
        for mod in self.model.modules():
            for name in list(mod._non_persistent_buffers_set):
                mod.register_buffer(name, mod._buffers[name], persistent=True)
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def load_pretrained(self) -> None:
        """The checkpoint's weights and buffers (non-persistent ones too, e.g. SigLIP's position ids,
        which `to_empty` leaves as uninitialised memory) into the built architecture."""
        from transformers import AutoModel
        loaded = AutoModel.from_pretrained(self.path, local_files_only=True)
        loaded = getattr(loaded, "vision_model", loaded)
        buffers = dict(loaded.named_buffers())
        missing, unexpected = self.model.load_state_dict(loaded.state_dict(), strict=False)
        bad = [k for k in missing if k not in buffers] + list(unexpected)
        _check(not bad, f"fae.encoder='hf:{self.path}': its weights {bad[:3]} do not fit the model of its config.json")
        for name, buf in buffers.items():
            self.model.get_buffer(name).copy_(buf)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # always frozen: no dropout, whatever the parent's mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1)  # (B, 3, H, W): grayscale is repeated
        mean, std = (x.new_tensor(v).view(1, 3, 1, 1) for v in (self.mean, self.std))
        x = ((x + 1) / 2 - mean) / std
        with torch.no_grad():
            h = self.model(pixel_values=x).last_hidden_state  # (B, T, E)
        return h[:, -self.n_tokens:]  # (B, N, E)


class FAE(nn.Module):
    """Images <-> latent tokens (B, N, latent_dim), in 'pixels' or 'fae' mode.

    Build, then call `init_weights()` (also after `to_empty(device=...)` from a meta build).
    """

    def __init__(self, cfg: FAEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.mode == "pixels":
            return
        E, Dd, C = cfg.encoder_dim, cfg.decoder_dim, cfg.latent_channels
        self.encoder = ConvEncoder(cfg) if cfg.encoder == "conv" else HFEncoder(cfg)
        # compression: ONE pre-norm residual self-attention layer, then a linear layer to C channels
        self.compress_norm = nn.LayerNorm(E)
        self.compress_attn = SelfAttention(E, cfg.n_heads)
        self.to_latent = nn.Linear(E, C)
        # feature decoder: latent -> encoder features
        self.latent_in = nn.Linear(C, Dd)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.n_tokens, Dd))
        self.decoder = nn.ModuleDict({str(i): Block(Dd, cfg.n_heads) for i in range(cfg.decoder_layers)})
        self.decoder_norm = nn.LayerNorm(Dd)
        self.to_features = nn.Linear(Dd, E)
        # pixel decoder: features -> pixels of each patch
        self.pixel_decoder = nn.Sequential(
            nn.LayerNorm(E), nn.Linear(E, Dd), nn.GELU(), nn.Linear(Dd, cfg.patch_size ** 2 * cfg.channels))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every trainable-part parameter from the global RNG, in module order; an 'hf:'
        encoder's weights are read again from its directory (pretrained, not initialised). An FAE
        still on the meta device (a pipeline stage that does not hold it) is left alone."""
        if self.cfg.mode == "pixels" or next(self.parameters()).is_meta:
            return
        for name, m in self.named_modules():
            if name.startswith("encoder.model"):
                continue  # pretrained weights of an 'hf:' encoder
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        if isinstance(self.encoder, HFEncoder):
            self.encoder.load_pretrained()

    def load_trained(self, path: str) -> None:
        """Every weight from a trained FAE file (`fae_train.save_fae`, `megaflow fae --out`). Its
        config must match this FAE's in every field that shapes the model or its features (the
        training-only fields and the encoder's directory may differ); otherwise ValueError naming
        the field, both values and what to set."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fae.checkpoint={path!r}: no such file; train one with `megaflow fae --config "
                                    f"FAE.yaml --out {path}` or leave fae.checkpoint empty")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "state_dict" not in ckpt:
            raise ValueError(f"fae.checkpoint={path!r} is not an FAE file (one written by `megaflow fae --out`)")
        saved = ckpt["config"]
        for name in FAEConfig.__dataclass_fields__:
            if name in ("checkpoint", "latent_penalty", "latent_noise") or name not in saved:
                continue
            mine, theirs = getattr(self.cfg, name), saved[name]
            if name == "encoder":  # the kind must agree; an hf checkpoint may have moved
                mine, theirs = mine.split(":")[0], str(theirs).split(":")[0]
            if mine != theirs:
                raise ValueError(f"fae.checkpoint={path!r} was trained with fae.{name}={saved[name]!r}, but this "
                                 f"run has fae.{name}={getattr(self.cfg, name)!r}; set model.fae.{name} to "
                                 f"{saved[name]!r} or train an FAE with this config")
        self.load_state_dict(ckpt["state_dict"])

    def freeze(self) -> "FAE":
        """No parameter trains any more and the model is in eval mode (its state under STARFlow2)."""
        self.requires_grad_(False)
        return self.eval()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's patch features (B, N, encoder_dim) of images in [-1, 1]."""
        return self.encoder(images)

    def compress(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, N, E) -> latents (B, N, C)."""
        h = features + self.compress_attn(self.compress_norm(features))
        return self.to_latent(h)  # (B, N, C)

    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, N, C) -> reconstructed encoder features (B, N, E)."""
        h = self.latent_in(latents) + self.pos_embed  # (B, N, Dd)
        for block in self.decoder.values():
            h = block(h)
        return self.to_features(self.decoder_norm(h))  # (B, N, E)

    def decode_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, N, E) -> images (B, channels, H, W)."""
        patches = self.pixel_decoder(features)  # (B, N, p*p*channels)
        return unpatchify(patches, self.cfg.patch_size, self.cfg.channels)  # (B, channels, H, W)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, channels, H, W) in [-1, 1] -> latents (B, N, latent_dim)."""
        self._check_images(images)
        if self.cfg.mode == "pixels":
            return patchify(images, self.cfg.patch_size)  # (B, N, p*p*channels)
        return self.compress(self.features(images))  # (B, N, C)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, N, latent_dim) -> images (B, channels, H, W), roughly in [-1, 1] (not clamped)."""
        if self.cfg.mode == "pixels":
            return unpatchify(latents, self.cfg.patch_size, self.cfg.channels)  # (B, channels, H, W)
        return self.decode_pixels(self.decode_features(latents))  # (B, channels, H, W)

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The FAE's reconstruction objective on images in [-1, 1].

        feature_mse: decoded features vs the encoder's features (a stop-gradient target);
        pixel_mse: images decoded through both decoders vs the input;
        latent_sq: mean(latent^2), weighted by cfg.latent_penalty in 'loss'.
        In training mode, latents get N(0, latent_noise^2) noise before decoding.
        """
        _check(self.cfg.mode == "fae", "FAE.loss: fae.mode='pixels' has nothing to train")
        self._check_images(images)
        feats = self.features(images)  # (B, N, E)
        latents = self.compress(feats)  # (B, N, C)
        noisy = latents
        if self.training and self.cfg.latent_noise > 0:
            noisy = latents + self.cfg.latent_noise * torch.randn_like(latents)
        feats_hat = self.decode_features(noisy)  # (B, N, E)
        images_hat = self.decode_pixels(feats_hat)  # (B, channels, H, W)
        out = {
            "feature_mse": F.mse_loss(feats_hat, feats.detach()),
            "pixel_mse": F.mse_loss(images_hat, images),
            "latent_sq": latents.pow(2).mean(),
        }
        out["loss"] = out["feature_mse"] + out["pixel_mse"] + self.cfg.latent_penalty * out["latent_sq"]
        return out

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        _check(images.dim() == 4 and tuple(images.shape[1:]) == want,
               f"FAE expects images of shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(images.shape)}")
