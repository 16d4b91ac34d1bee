"""Acceptance 2 (model issue): one causal mask over the interleaved sequence. Changing the input at
position j (a text token, or an image latent) changes nothing at positions < j: text logits,
Gaussian parameters, and the hidden states of both streams after every unit."""
import pytest
import torch

from tests.helpers import make_batch, tiny_config
from tests.model.util import randomized_model


def _trace(model, batch, flow_x):
    """Per-unit hidden states of both streams, logits and Gaussian params, all (B, T, ...)."""
    ctx = model.context(batch)
    state = model.embed(batch, ctx, flow_x=flow_x)
    out = []
    for unit in model.units.values():
        state = unit(state, ctx)
        out += [state[0], state[1]]
    mu, sigma = model.flow_params(state[1])
    out += [mu, sigma]
    if model.lm_head is not None:
        out.append(model.text_logits(state[0]))
    return out


def _flow_x(model, batch):
    ctx = model.context(batch)
    return model.embed(batch, ctx)[2]


@pytest.mark.parametrize("tarflow_only", [False, True])
@pytest.mark.parametrize("kind", ["text", "image"])
def test_change_at_j_changes_nothing_before_j(kind, tarflow_only):
    cfg = tiny_config(tarflow_only=tarflow_only)
    model = randomized_model(cfg, scale=0.2)
    batch = make_batch(cfg, batch_size=1, seq_len=48, two_docs=False)  # text-image-text-image-text
    image_pos = batch["image_mask"][0].nonzero().flatten().tolist()
    text_pos = [p for p in range(48) if p not in image_pos and batch["doc_ids"][0, p] >= 0]
    with torch.no_grad():
        fx = _flow_x(model, batch)
        base = _trace(model, batch, fx)
        # j: a position inside the SECOND image or the text between the images
        js = image_pos[len(image_pos) // 2 + 3: len(image_pos) // 2 + 5] if kind == "image" else text_pos[4:6]
        for j in js:
            b2, fx2 = dict(batch), fx.clone()
            if kind == "text":
                b2["tokens"] = batch["tokens"].clone()
                b2["tokens"][0, j] = (int(batch["tokens"][0, j]) + 7) % 50
            else:
                fx2[0, j] += 1.0
            changed = _trace(model, b2, fx2)
            for a, b in zip(base, changed):
                assert torch.equal(a[:, :j], b[:, :j]), f"position < {j} changed"
            assert any(not torch.equal(a[:, j:], b[:, j:]) for a, b in zip(base, changed)), "change had no effect at all"


def test_image_pixels_only_affect_their_own_slots_and_later():
    """Changing an image's pixels (through the shallow flows) changes nothing before its image-start."""
    cfg = tiny_config()
    model = randomized_model(cfg, scale=0.2)
    batch = make_batch(cfg, batch_size=1, seq_len=48, two_docs=False)
    second = batch["image_mask"][0].nonzero().flatten()[cfg.fae.n_tokens].item()
    with torch.no_grad():
        base = _trace(model, batch, _flow_x(model, batch))
        b2 = dict(batch)
        b2["images"] = batch["images"].clone()
        b2["images"][0, 1] = -b2["images"][0, 1]
        changed = _trace(model, b2, _flow_x(model, b2))
    for a, b in zip(base, changed):
        assert torch.equal(a[:, :second], b[:, :second])
    assert not torch.equal(base[-1][:, second:], changed[-1][:, second:])


def test_packed_documents_do_not_see_each_other():
    """Two documents packed in one row: the second one's outputs equal those of it alone."""
    cfg = tiny_config()
    model = randomized_model(cfg, scale=0.2)
    batch = make_batch(cfg, batch_size=1, seq_len=48, two_docs=True)
    start = int((batch["doc_ids"][0] == 1).nonzero()[0])
    alone = {k: (v[:, start:] if k in ("tokens", "position_ids", "doc_ids", "image_mask") else v) for k, v in batch.items()}
    alone["doc_ids"] = alone["doc_ids"] - 1
    alone["image_valid"] = torch.zeros_like(batch["image_valid"])
    with torch.no_grad():
        packed = _trace(model, batch, _flow_x(model, batch))
        single = _trace(model, alone, torch.zeros(1, 48 - start, cfg.fae.latent_dim))
    for a, b in zip(packed, single):
        assert torch.allclose(a[:, start:], b, atol=1e-5)
