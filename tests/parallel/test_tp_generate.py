"""Generation under tensor parallelism equals single-process generation (real gloo processes).

Contract: a TP=2 model loaded from the single-process model's weights samples, for the same seed,
the same text tokens (greedy and temperature 1, with an image in the prompt) and the same images
and deep-flow latents (with and without classifier-free guidance, including the score-based denoise
step through the whole TP model), also when images are sampled by Jacobi iteration. Logits are
gathered over the vocabulary only for sampling. Generation runs without sequence parallelism
(decoding feeds one token at a time).
"""
from __future__ import annotations

import torch

from megaflow.model.generate import sample_images, sample_text
from parallel.tensor_parallel import build_tp_model
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import SPECIAL, tiny_config
from tests.model.util import randomized_model

PROMPTS = [[SPECIAL.bos_id, 5, 6, 7], [SPECIAL.bos_id, 9]]  # different lengths: left padding


def _worker(rank, world):
    cfg = tiny_config()
    ref = randomized_model(cfg, scale=0.1)
    model = build_tp_model(cfg, Topology(tp=world), ParallelConfig(tp=world), state_dict=ref.state_dict())
    assert model.lm_head.weight.shape[0] == cfg.vlm.vocab_size // world
    out = {"image_err": 0.0, "latent_err": 0.0}
    for guidance in (0.0, 2.0):
        a, dec_a = sample_images(ref, PROMPTS, guidance=guidance, seed=5)
        b, dec_b = sample_images(model, PROMPTS, guidance=guidance, seed=5)
        out["image_err"] = max(out["image_err"], float((a - b).abs().max()))
        out["latent_err"] = max(out["latent_err"], float((dec_a.flow_x - dec_b.flow_x).abs().max()))
    out["image_scale"] = float(a.abs().max())
    a, _ = sample_images(ref, PROMPTS, guidance=2.0, seed=5, method="jacobi", chunk=8)
    b, _ = sample_images(model, PROMPTS, guidance=2.0, seed=5, method="jacobi", chunk=8)
    out["jacobi_err"] = float((a - b).abs().max())
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = [[SPECIAL.bos_id, 3, image, 4], [SPECIAL.bos_id, 8]]
    out["text"] = []
    for temperature in (0.0, 1.0):
        out["text"].append((sample_text(ref, prompts, max_new_tokens=8, temperature=temperature, seed=2),
                            sample_text(model, prompts, max_new_tokens=8, temperature=temperature, seed=2)))
    return out


def test_tp2_generation_equals_single_process():
    for r in run_distributed(_worker, 2):
        assert r["image_scale"] > 0.1, "images are trivially constant"
        assert r["image_err"] < 1e-5 and r["latent_err"] < 1e-5 and r["jacobi_err"] < 1e-5, r
        for ref_tokens, tp_tokens in r["text"]:
            assert ref_tokens == tp_tokens and sum(map(len, ref_tokens)) > 2, r["text"]
