"""Packing contract on hand-made documents: rows of exactly T, images never split, long documents
cut at text only, targets only on text-like next tokens of the same document, overflow counted."""

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.packing import pack_documents, split_document, tokenize_document
from data_pipeline.schema import Segment
from tests.data_pipeline.helpers import check_batch

CFG = DataConfig(seq_len=48, batch_size=3, samples_per_batch=4, image_size=8, patch_size=2,
                 channels=1, max_images=2)  # image_tokens = 16, an image takes 18 slots


def _image(value: int) -> Segment:
    return Segment("image", True, pixels=np.full((1, 8, 8), value, np.uint8))


def _doc(tok, segments, name):
    return tokenize_document(segments, tok, CFG.image_tokens, name)


def test_layout_targets_and_masks(tok):
    docs = [_doc(tok, [Segment("text", False, text="a photo of a bag"), _image(255)], "t2i"),
            _doc(tok, [_image(0), Segment("text", False, text="What is this?"),
                       Segment("text", True, text="A bag.")], "i2t")]
    batch, stats = pack_documents(docs, CFG, tok)
    check_batch(batch, tok, CFG)
    assert stats.overflow_docs == 0 and stats.docs == 2
    rows = [batch["tokens"][b][batch["doc_ids"][b] >= 0].tolist() for b in range(CFG.batch_size)]
    flat = [t for row in rows for t in row]
    assert flat.count(tok.bos_id) == 2 and flat.count(tok.eos_id) == 2 and flat.count(tok.boi_id) == 2
    # t2i: the prompt carries no loss but boi (start the image) and eos do
    t2i_row = next(b for b in range(3) if batch["tokens"][b, 1].item() != tok.boi_id and batch["doc_ids"][b, 0] == 0)
    targets = batch["targets"][t2i_row][batch["targets"][t2i_row] != -100].tolist()
    assert tok.boi_id in targets and tok.eos_id in targets
    assert not set(targets) & set(tok.encode("a photo of a bag"))
    # the image of row r is images[r, 0] and is normalised to [-1, 1]
    values = {round(batch["images"][b, 0].mean().item(), 3) for b in range(3) if batch["image_valid"][b, 0]}
    assert values == {1.0, -1.0}


def test_long_document_is_cut_at_text_only(tok):
    words = " ".join(["word"] * 30)
    segments = [Segment("text", True, text=words), _image(10), Segment("text", True, text=words),
                _image(20), _image(30), _image(40), Segment("text", True, text="end")]
    doc = _doc(tok, segments, "long")
    pieces = split_document(doc, CFG.seq_len, CFG.max_images, CFG.image_tokens)
    assert sum(e - s for s, e in pieces) == len(doc.tokens) and all(e - s <= CFG.seq_len for s, e in pieces)
    for start, end in pieces:
        for boi in doc.image_starts:
            assert not (boi < start < boi + CFG.image_tokens + 2)  # never a cut inside an image
    cfg = DataConfig(**{**CFG.__dict__, "batch_size": 8})
    batch, stats = pack_documents([doc], cfg, tok)
    check_batch(batch, tok, cfg)
    assert stats.pieces == len(pieces) and stats.overflow_docs == 0
    assert int(batch["image_valid"].sum()) == 4


def test_overflow_is_dropped_and_counted(tok):
    docs = [_doc(tok, [Segment("text", True, text="x " * 40)], f"doc{i}") for i in range(8)]
    batch, stats = pack_documents(docs, CFG, tok)
    check_batch(batch, tok, CFG)
    assert stats.overflow_docs > 0 and stats.overflow_tokens > 0 and stats.overflow_sources
    assert int((batch["doc_ids"] >= 0).sum()) + stats.overflow_tokens == sum(len(d.tokens) for d in docs)


def test_deterministic(tok):
    docs = [_doc(tok, [Segment("text", True, text=f"doc {i} " * i), _image(i)], str(i)) for i in range(5)]
    first, _ = pack_documents(docs, CFG, tok)
    second, _ = pack_documents(docs, CFG, tok)
    assert all(np.array_equal(first[k], second[k]) for k in first)
