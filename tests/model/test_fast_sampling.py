"""Issue 14, fast sampling (CPU): the preallocated KV cache and the graph-shaped one-token steps
sample what the earlier cache (torch.cat per token) and the uncached recompute sample, for the same
seed: images within 1e-5 (with guidance and the denoise step, whose image is re-encoded, i.e. the
cache is truncated and refilled), text tokens exactly, interleaved documents segment by segment.
graphs=True on CPU runs the very step function a CUDA graph captures (every step attends to all
slots of the capacity), so its math is covered here. Jacobi of a single shallow block converges to
its sequential inverse and reports iterations (the trained-model check is tests/train/)."""
import pytest
import torch

from megaflow.model.decoding import StaticKVCache
from megaflow.model.generate import Decoder, generate, sample_images, sample_text
from tests.helpers import SPECIAL, tiny_config
from tests.model.util import randomized_model

PROMPTS = [[SPECIAL.bos_id, 5, 6, 7], [SPECIAL.bos_id, 9]]  # different lengths: left padding
WAYS = [dict(cache="static"), dict(cache="static", graphs=True), dict(cache="concat"), dict(use_cache=False)]


@pytest.mark.parametrize("tarflow_only", [False, True])
def test_static_cache_images_equal_earlier_cache_and_uncached(tarflow_only):
    model = randomized_model(tiny_config(tarflow_only=tarflow_only), scale=0.1)
    prompts = [[SPECIAL.bos_id, 5], [SPECIAL.bos_id, 9]] if tarflow_only else PROMPTS
    for guidance in (0.0, 2.0):
        images = [sample_images(model, prompts, guidance=guidance, seed=5, **way)[0] for way in WAYS]
        assert images[0].abs().max() > 0.1, "images are trivially constant"
        for other in images[1:]:
            assert (images[0] - other).abs().max() < 1e-5


def test_static_cache_text_and_interleaved_equal_earlier_cache():
    model = randomized_model(tiny_config(), scale=0.1)
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = [[SPECIAL.bos_id, 3, image, 4], [SPECIAL.bos_id, 8]]
    texts = [sample_text(model, prompts, max_new_tokens=8, temperature=1.0, seed=2, **way) for way in WAYS]
    assert all(t == texts[0] for t in texts) and sum(map(len, texts[0])) > 4, texts
    bias = torch.zeros(SPECIAL.image_id + 1)
    bias[SPECIAL.boi_id] = 4.0  # images now and then, text between them
    plain = model.text_logits
    model.text_logits = lambda h: plain(h) + bias
    docs = [generate(model, [SPECIAL.bos_id, 5], max_new_tokens=10, temperature=1.0, guidance=1.5, seed=1,
                     max_images=2, **way) for way in (dict(), dict(graphs=True), dict(cache="concat"))]
    n_images = sum(torch.is_tensor(s) for s in docs[0])
    assert n_images == 2 and len(docs[0]) > 2 * 3, docs[0]
    for doc in docs[1:]:
        assert len(doc) == len(docs[0])
        for a, b in zip(docs[0], doc):
            assert (a - b).abs().max() < 1e-5 if torch.is_tensor(a) else a == b


def test_static_cache_grows_and_writes_in_place():
    """Feeding past the capacity doubles the buffers (keeping what was written); the per-layer
    buffers are allocated once and written in place, not re-concatenated."""
    model = randomized_model(tiny_config(), scale=0.1)
    dec = Decoder(model, 1, capacity=4)
    dec.feed(torch.tensor([[SPECIAL.bos_id, 5, 6]]))
    kb = next(iter(dec.cache.buffers.values()))[0]
    dec.text_step(torch.tensor([[7]]))
    assert next(iter(dec.cache.buffers.values()))[0] is kb and dec.capacity == 4
    logits = dec.text_step(torch.tensor([[8]])).clone()  # position 5 of capacity 4: grows
    assert dec.capacity == 8 and dec.length == 5
    fresh = Decoder(model, 1, use_cache=False)
    fresh.feed(torch.tensor([[SPECIAL.bos_id, 5, 6, 7, 8]]))
    assert (fresh.next_logits() - logits).abs().max() < 1e-5
    assert isinstance(dec.cache, StaticKVCache)


def test_shallow_block_jacobi_converges_to_sequential():
    block = randomized_model(tiny_config(), scale=0.2).shallow.blocks[0]
    z = torch.randn(3, 16, 4, generator=torch.Generator().manual_seed(0))
    seq_stats, jac_stats, full = [], [], []
    seq = block.inverse(z, stats=seq_stats)
    jac = block.inverse(z, method="jacobi", tol=1e-6, stats=jac_stats)
    exact = block.inverse(z, method="jacobi", tol=-1.0, stats=full)  # never stops early: N - 1 iterations
    assert seq_stats == [16] and full == [15] and 1 <= jac_stats[0] <= 16
    assert (seq - exact).abs().max() < 1e-5 and (seq - jac).abs().max() < 1e-5
    assert (seq - z).abs().max() > 1e-2, "block is the identity: test would prove nothing"
    with pytest.raises(ValueError, match="unknown sampling method"):
        block.inverse(z, method="newton")


def test_steps_that_communicate_are_not_captured():
    """ZeRO-3 leaves empty placeholder parameters (gathered by hooks at every forward) and TP
    layers carry a group: both communicate inside a step, so CUDA graphs must stay off."""
    from megaflow.model.decoding import communicates_in_step
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not communicates_in_step(plain)
    partitioned = torch.nn.Sequential(torch.nn.Linear(4, 4))
    partitioned[0].weight.data = torch.empty(0)
    assert communicates_in_step(partitioned)
    tp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    tp[0].tp_group = object()
    assert communicates_in_step(tp)
