"""The monitor counts real work only (issue 12): tokens/s counts non-padding tokens, the slot fill is
real tokens / (B x T), MFU's FLOPs cover real tokens and attention within each document piece (not
T x T), and the loader's dropped-document count is reported beside them."""
from __future__ import annotations

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
