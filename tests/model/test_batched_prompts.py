"""Issue 14, the report's sampling (megaflow/quality.py sample_prompts): all prompts' images in one
batched call (left-padded prompts of different lengths, guidance, the denoise step) equal what one
call per prompt with that prompt's seed samples (1e-5), so the quality figures do not move; with
graphs=True (graph-shaped steps) too. The batched call's noise is given explicitly (`z`)."""
import torch

from megaflow.model.generate import sample_images
from megaflow.quality import sample_prompts
from tests.helpers import SPECIAL, tiny_config
from tests.model.util import randomized_model


def test_batched_prompts_equal_one_call_per_prompt():
    model = randomized_model(tiny_config(), scale=0.1)
    prompts = [[SPECIAL.bos_id, 5, 6, 7], [SPECIAL.bos_id, 9], [SPECIAL.bos_id, 3, 3]]
    seeds = [11, 12, 13]
    for graphs in (None, True):
        batched = sample_prompts(model, prompts, 3, 2.0, 0.8, seeds, {"graphs": graphs})  # (3, 3, C, H, W)
        for p, s, got in zip(prompts, seeds, batched):
            alone, _ = sample_images(model, [p] * 3, guidance=2.0, temperature=0.8, seed=s)
            assert (alone - got).abs().max() < 1e-5
    assert (batched[0] - batched[1]).abs().max() > 0.1, "prompts sample the same images: test would prove nothing"
