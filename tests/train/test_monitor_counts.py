"""The monitor counts real work only (issue 12): tokens/s counts non-padding tokens, the slot fill is
real tokens / (B x T), MFU's FLOPs cover real tokens and attention within each document piece (not
T x T), and the loader's dropped-document count is reported beside them."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megaflow.monitor import Monitor, model_counts, piece_lengths, step_flops
from megaflow.model.starflow import STARFlow2
from tests.helpers import make_batch, tiny_config


def test_piece_lengths_and_flops_follow_the_documents():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert piece_lengths(doc_ids).tolist() == [3, 2, 8]
    cfg = tiny_config()
    with torch.device("meta"):
        model = STARFlow2(cfg)
    c = model_counts(model)
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    lengths = piece_lengths(batch["doc_ids"]).double()
    images = int(batch["image_mask"].sum())
    expected = (6.0 * c["matmul"] * float(lengths.sum()) + 6.0 * c["shallow"] * images
                + 12.0 * c["attn_width"] * float((lengths ** 2).sum()) + 12.0 * c["shallow_attn"] * images)
    assert step_flops(model, batch) == expected
    padded = dict(batch, doc_ids=torch.where(torch.arange(48) < 24, batch["doc_ids"], -1))
    assert step_flops(model, padded) < step_flops(model, batch)  # padding is not work


def test_monitor_reports_real_tokens_slot_fill_and_dropped_docs(tmp_path):
    from data_pipeline.config import DataConfig
    from megaflow.config import Config, TrainConfig
    cfg = Config(model=tiny_config(), data=DataConfig(image_size=8, patch_size=2, channels=1),
                 train=TrainConfig(log_every=1))
    with torch.device("meta"):
        model = STARFlow2(cfg.model)
    model.to_empty(device="cpu")
    data_stats = {"dropped_docs": 0}
    mon = Monitor(tmp_path, cfg, model, total=2, dp=2, data_stats=data_stats)
    batch = make_batch(cfg.model, batch_size=2, seq_len=48)
    batch["doc_ids"][1, 30:] = -1  # padding at the end of row 1
    mon.step(1, batch, {"loss": 1.0}, 1e-3)
    real = int((batch["doc_ids"] >= 0).sum())
    stats = mon.last_stats
    assert stats["slot_fill"] == real / 96 and stats["dropped_docs"] == 0
    assert 0 < stats["tokens_per_s"] and abs(stats["tokens_per_s"] * stats["step_s"] - 2 * real) < 1e-6 * real
    mon.close()


def _pieces(batch: dict, n_tokens: int) -> list:
    """Each document piece of a packed batch as a batch of its own: one row of exactly its tokens and
    images, no padding, no other document (doc_ids None: plain causal attention)."""
    out = []
    for b in range(batch["tokens"].shape[0]):
        d, seen = batch["doc_ids"][b], 0
        for doc in d[d >= 0].unique().tolist():
            sel = d == doc
            n_img = int(batch["image_mask"][b, sel].sum()) // n_tokens
            one = {k: batch[k][b:b + 1, sel] for k in ("tokens", "targets", "position_ids", "image_mask")}
            one.update(doc_ids=None, images=batch["images"][b:b + 1, seen:seen + n_img],
                       image_valid=torch.ones(1, n_img, dtype=torch.bool))
            seen += n_img
            out.append(one)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_step_flops_equal_a_hand_count_of_the_real_work(tied):
    """MFU's FLOPs (step_flops) of a packed batch with padding, two documents in a row and an unused
    image slot equal a count made without the rule: torch's FlopCounterMode over the model's forward
    run on each document piece ALONE (exactly its tokens and images, nothing padded or masked out),
    x 3 for forward + backward. In bf16 on the CPU attention runs as two matmuls, which it counts.
    Fails on a rule that counts padding, cross-document pairs or padded image slots, and (tied=True)
    on the old rule, which dropped a tied LM head's matmul with the embedding's duplicate weight."""
    from torch.utils.flop_counter import FlopCounterMode

    from megaflow.model.starflow import build_model
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, vlm=dataclasses.replace(cfg.vlm, tie_embeddings=tied))
    model = build_model(cfg).to(torch.bfloat16)
    batch = make_batch(cfg, batch_size=2, seq_len=48)  # row 0: 2 documents; row 1: 1 image of 2 slots, padding
    assert (batch["doc_ids"] < 0).any() and not batch["image_valid"].all()
    hand = 0
    with torch.no_grad():
        for one in _pieces(batch, cfg.fae.n_tokens):
            with FlopCounterMode(display=False) as counter:
                model.terms(one)
            hand += 3 * counter.get_total_flops()
    assert step_flops(model, batch) == hand
