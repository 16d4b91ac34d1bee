"""Configuration dataclasses of the STARFlow2 model.

Frozen dataclasses; each field's trailing comment is its help text (`megaflow info --help-config`).
This file holds only the model's own sub-configs; data, training and parallel configs live with
their subsystems and are composed in `megaflow/config.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megaflow.model.fae import FAEConfig


DEQUANTIZATIONS = ("gaussian", "uniform")  # flow.dequantization


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class VLMConfig:
    """The language-model stream (Llama / Qwen2 family)."""
    vocab_size: int = 512  # rows of the token embedding (tokenizer vocab incl. special tokens)
    dim: int = 128  # hidden size
    n_layers: int = 4  # decoder layers
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); == n_heads for MHA
    head_dim: int = 0  # per-head size; 0 means dim // n_heads
    ffn_dim: int = 256  # SwiGLU inner size
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the LM head with the token embedding
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2)

    def __post_init__(self):
        hd = self.head_dim or self.dim // max(self.n_heads, 1)
        _check(self.n_heads > 0 and self.n_kv_heads > 0, f"vlm.n_heads={self.n_heads} and vlm.n_kv_heads={self.n_kv_heads} must be positive")
        _check(self.n_heads % self.n_kv_heads == 0, f"vlm.n_heads={self.n_heads} must be a multiple of vlm.n_kv_heads={self.n_kv_heads}")
        _check(self.head_dim > 0 or self.dim % self.n_heads == 0, f"vlm.dim={self.dim} is not divisible by vlm.n_heads={self.n_heads}; set vlm.head_dim")
        _check(hd % 2 == 0, f"vlm head_dim={hd} must be even for RoPE")

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


@dataclass(frozen=True)
class FlowConfig:
    """The TarFlow stream: deep (Pretzel-coupled) layers and the shallow blocks."""
    dim: int = 128  # deep flow stream hidden size
    n_heads: int = 4  # deep flow attention heads
    ffn_dim: int = 256  # deep flow SwiGLU inner size
    n_layers: int = 4  # deep flow layers; with a VLM stream, vlm.n_layers must equal ratio * n_layers
    ratio: int = 1  # r: VLM layers per Pretzel unit (each unit = r VLM layers, then one flow layer)
    skip_vlm_to_flow: bool = True  # h_flow += W_vlm(h_vlm) after each unit's VLM layers
    skip_flow_to_vlm: bool = True  # h_vlm += W_d(h_flow) at image positions after each flow layer
    n_shallow: int = 2  # number of shallow TarFlow blocks over each image's own tokens
    shallow_layers: int = 2  # transformer layers per shallow block
    shallow_dim: int = 64  # shallow block hidden size
    shallow_heads: int = 2  # shallow block attention heads
    shallow_ffn_dim: int = 0  # shallow block SwiGLU inner size (0 = 4 x shallow_dim); set it to match a peer's size
    noise_std: float = 0.05  # std of the Gaussian noise added to latents in training (dequantization 'gaussian')
    dequantization: str = "gaussian"  # training input noise: 'gaussian' (latent + noise_std * N(0, 1); bits/dim then is a continuous NLL, not TarFlow's scale) or 'uniform' (fae.mode 'pixels' only: 8-bit pixel p -> (p + u) / 128 - 1, u ~ U[0, 1), TarFlow's dequantisation)
    clip: float = 4.0  # soft clip c of the Gaussian parameters: c * tanh(o / c)
    rope_theta: float = 10000.0  # RoPE base of the flow layers
    norm_eps: float = 1e-5  # RMSNorm epsilon
    cond_drop: float = 0.1  # probability of dropping the condition (for classifier-free guidance)
    n_cond_tokens: int = 0  # TarFlow-only: size of the flow stream's own token table (0 = use vlm.vocab_size)

    def __post_init__(self):
        _check(self.dim % self.n_heads == 0, f"flow.dim={self.dim} is not divisible by flow.n_heads={self.n_heads}")
        _check(self.shallow_dim % self.shallow_heads == 0, f"flow.shallow_dim={self.shallow_dim} is not divisible by flow.shallow_heads={self.shallow_heads}")
        _check((self.dim // self.n_heads) % 2 == 0, f"flow head dim {self.dim // self.n_heads} must be even for RoPE")
        _check(self.n_layers > 0, f"flow.n_layers={self.n_layers} must be positive")
        _check(self.shallow_ffn_dim >= 0, f"flow.shallow_ffn_dim={self.shallow_ffn_dim} must be >= 0 (0 = 4 x shallow_dim)")
        _check(self.n_shallow >= 0, f"flow.n_shallow={self.n_shallow} must be >= 0")
        _check(0.0 <= self.cond_drop < 1.0, f"flow.cond_drop={self.cond_drop} must be in [0, 1)")
        _check(self.dequantization in DEQUANTIZATIONS,
               f"flow.dequantization={self.dequantization!r} is not one of {DEQUANTIZATIONS}")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training objective."""
    w_text: float = 1.0  # weight of the text cross-entropy
    w_img: float = 1.0  # weight of the flow NLL per dimension
    w_latent_norm: float = 1e-4  # penalty on the mean square of intermediate shallow-block outputs


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the reserved tokens (set from the tokenizer; they sit after the base vocabulary)."""
    pad_id: int = 0  # padding
    bos_id: int = 1  # beginning of a document
    eos_id: int = 2  # end of a document
    boi_id: int = 3  # image start
    eoi_id: int = 4  # image end
    image_id: int = 5  # placeholder token at every image-latent slot


STAGES = ("t2i", "i2t", "joint", "all")
ADAPTER_INPUTS = ("latent", "flow")


@dataclass(frozen=True)
class ModelConfig:
    """A STARFlow2 model: VLM stream (optional), FAE latent space, flow streams, losses."""
    vlm: Optional[VLMConfig] = field(default_factory=VLMConfig)  # None = TarFlow-only model
    flow: FlowConfig = field(default_factory=FlowConfig)
    fae: FAEConfig = field(default_factory=FAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    stage: str = "joint"  # curriculum stage: t2i (flows train), i2t (adapter trains), joint, all (everything)
    adapter_input: str = "latent"  # what the VLM reads at image slots: latent (the FAE latent; the deep flow then takes no VLM skip at image slots) or flow (the shallow flows' output)
    max_seq_len: int = 4096  # longest sequence for generation checks
    mask_block: int = 64  # tokens a side of FlexAttention's document-mask blocks: 64 or 128 (megaflow.model.masks; 64: h200_1b's real-data step 169.9 -> 166.7 ms)

    def __post_init__(self):
        _check(self.stage in STAGES, f"model.stage={self.stage!r} is not one of {STAGES}")
        _check(self.mask_block in (128, 64), f"model.mask_block={self.mask_block} is not 128 or 64")
        _check(self.adapter_input in ADAPTER_INPUTS,
               f"model.adapter_input={self.adapter_input!r} is not one of {ADAPTER_INPUTS}")
        if self.vlm is not None:
            want = self.flow.ratio * self.flow.n_layers
            _check(self.vlm.n_layers == want,
                   f"vlm.n_layers={self.vlm.n_layers} must equal flow.ratio * flow.n_layers = "
                   f"{self.flow.ratio} * {self.flow.n_layers} = {want}; change flow.n_layers or flow.ratio")
        _check(self.flow.dequantization != "uniform" or self.fae.mode == "pixels",
               f"flow.dequantization='uniform' dequantises 8-bit pixels and needs fae.mode='pixels', not "
               f"{self.fae.mode!r}; use flow.dequantization=gaussian for FAE latents")
        special = [self.tokens.pad_id, self.tokens.bos_id, self.tokens.eos_id, self.tokens.boi_id,
                   self.tokens.eoi_id, self.tokens.image_id]
        _check(len(set(special)) == len(special), f"special token ids must be unique, got {special}")

    @property
    def vocab_size(self) -> int:
        if self.vlm is not None:
            return self.vlm.vocab_size
        return self.flow.n_cond_tokens
