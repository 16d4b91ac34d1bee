"""Issue 14: Jacobi sampling equals sequential sampling on a trained model (configs/tiny.yaml after
its 60 steps, the shared `tiny_run` fixture), and reports its iterations.

Contract: for the same seed, method="jacobi" (block-wise: windows of `chunk` tokens, tol 1e-5 on
the largest change) gives the sequential reference's images within 1e-4, with and without
guidance, for whole-image windows and for windows of 4 tokens; dec.stats reports the deep flow's
and each shallow block's iterations, which never exceed the sequential step count. An interleaved
document (text, image, text through the re-encoded cache) is the same under both methods."""
from __future__ import annotations

import torch

from megaflow.inference import load_for_inference
from megaflow.model.generate import generate, sample_images


def test_jacobi_equals_sequential_on_the_trained_tiny_model(tiny_run):
    torch.set_num_threads(1)
    model, tok, cfg, _ = load_for_inference(tiny_run)
    N, blocks = cfg.model.fae.n_tokens, cfg.model.flow.n_shallow
    prompt = [tok.bos_id] + tok.encode("Here are some pictures.")
    for guidance in (0.0, 2.0):
        seq, dseq = sample_images(model, [prompt] * 3, guidance=guidance, seed=4)
        assert dseq.stats == {"deep": N, "shallow": [N] * blocks}
        assert seq.std() > 0.1, "the trained model samples constant images: test would prove nothing"
        for chunk in (64, 4):
            jac, djac = sample_images(model, [prompt] * 3, guidance=guidance, seed=4, method="jacobi", tol=1e-5,
                                      chunk=chunk)
            assert (seq - jac).abs().max() < 1e-4, (guidance, chunk, float((seq - jac).abs().max()))
            its = [djac.stats["deep"], *djac.stats["shallow"]]
            assert len(its) == 1 + blocks and all(1 <= i <= N for i in its), djac.stats
    doc = [generate(model, prompt, max_new_tokens=12, temperature=0.0, guidance=1.0, seed=2, max_images=1,
                    method=m, tol=1e-5) for m in ("sequential", "jacobi")]
    assert len(doc[0]) == len(doc[1]) and sum(torch.is_tensor(s) for s in doc[0]) == 1, doc[0]
    for a, b in zip(*doc):
        assert (a - b).abs().max() < 1e-4 if torch.is_tensor(a) else a == b
