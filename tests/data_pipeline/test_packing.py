"""Packing contract on hand-made documents: rows of exactly T, images never split, long documents
cut at text only, targets only on text-like next tokens of the same document; the planner fills
rows to the token budget and carries what does not fit into later steps, never dropping it; the
`fullest` packing gives each row the subset that fills it most (checked against brute force)."""

import itertools
import random

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.packing import Planner, build_batch, fullest_subset, split_document, tokenize_document
from data_pipeline.schema import Segment
from tests.data_pipeline.helpers import check_batch

CFG = DataConfig(seq_len=48, batch_size=3, image_size=8, patch_size=2,
                 channels=1, max_images=2)  # image_tokens = 16, an image takes 18 slots


def _image(value: int) -> Segment:
    return Segment("image", True, pixels=np.full((1, 8, 8), value, np.uint8))


def _doc(tok, segments, name):
    return tokenize_document(segments, tok, CFG.image_tokens, name)


def _plan(docs, cfg=CFG, lookahead=2.0, packing="fullest"):
    """Every step of a Planner over `docs` (sample id = index), as rows of (doc, start, end)."""
    def measure(i):
        doc = docs[i]
        return [(i, s, e, sum(1 for b in doc.image_starts if s <= b < e))
                for s, e in split_document(doc, cfg.seq_len, cfg.max_images, cfg.image_tokens)]
    planner = Planner(list(range(len(docs))), measure, cfg.batch_size, cfg.seq_len, cfg.max_images, lookahead,
                      packing=packing)
    steps = []
    while (rows := planner.step()) is not None:
        steps.append([[(docs[i], s, e) for i, s, e, _ in row] for row in rows])
    return steps


def pack_documents(docs, cfg, tok):
    """One batch holding all `docs` (the test makes sure they fit in one step)."""
    steps = _plan(docs, cfg)
    assert len(steps) == 1
    return build_batch(steps[0], cfg, tok)


def test_layout_targets_and_masks(tok):
    docs = [_doc(tok, [Segment("text", False, text="a photo of a bag"), _image(255)], "t2i"),
            _doc(tok, [_image(0), Segment("text", False, text="What is this?"),
                       Segment("text", True, text="A bag.")], "i2t")]
    batch, stats = pack_documents(docs, CFG, tok)
    check_batch(batch, tok, CFG)
    assert stats.dropped_docs == 0 and stats.pieces == 2
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
    assert stats.pieces == len(pieces) and stats.dropped_docs == 0
    assert int(batch["image_valid"].sum()) == 4


def test_what_does_not_fit_is_carried_over_never_dropped(tok):
    """8 documents of 41 tokens into steps of 3 rows of 48: one per row, the rest carried into the
    next steps in order; every token placed exactly once, the oldest pending document first."""
    docs = [_doc(tok, [Segment("text", True, text="x " * 40)], f"doc{i}") for i in range(8)]
    steps = _plan(docs)
    assert len(steps) == 3
    placed = [(d.source, s, e) for rows in steps for row in rows for d, s, e in row]
    assert sorted(placed) == sorted((d.source, 0, len(d.tokens)) for d in docs)
    assert [d.source for d, _, _ in (p for row in steps[0] for p in row)] == ["doc0", "doc1", "doc2"]
    for rows in steps:
        batch, stats = build_batch(rows, CFG, tok)
        check_batch(batch, tok, CFG)
        assert stats.dropped_docs == 0


def test_first_fit_fills_gaps_from_the_look_ahead(tok):
    """A long document leaves room that later short ones fill (first-fit over the look-ahead),
    and the images-per-row limit is respected."""
    long = _doc(tok, [Segment("text", True, text="y " * 29)], "long")  # 32 tokens
    short = [_doc(tok, [Segment("text", True, text="z " * 5)], f"s{i}") for i in range(6)]  # 8 tokens
    images = [_doc(tok, [_image(i)], f"img{i}") for i in range(4)]  # 20 tokens, 1 image
    docs = [long, long, long] + images + short
    steps = _plan(docs, lookahead=3.0, packing="first_fit")
    first = steps[0]
    assert [d.source for d, _, _ in first[0]] == ["long", "s0", "s1"]  # 32 + 8 + 8 = 48: the images (20) wait
    for rows in steps:
        assert all(sum(len(d.image_starts) for d, _, _ in row) <= CFG.max_images for row in rows)
        assert all(sum(e - s for _, s, e in row) <= CFG.seq_len for row in rows)
    assert sorted(d.source for rows in steps for row in rows for d, _, _ in row) == sorted(d.source for d in docs)


def test_deterministic(tok):
    docs = [_doc(tok, [Segment("text", True, text=f"doc {i} " * i), _image(i)], str(i)) for i in range(5)]
    first = [build_batch(rows, CFG, tok)[0] for rows in _plan(docs)]
    second = [build_batch(rows, CFG, tok)[0] for rows in _plan(docs)]
    assert len(first) == len(second) == 2
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, second) for k in a)


def test_fullest_subset_is_the_best_fill_by_brute_force():
    """On random small candidate sets: the most tokens within the room and the image limit, and
    among those the fewest images (checked over every subset; for an exact fill, over the subsets
    of the shortest prefix of candidates that has one, where the search stops); keys in order."""
    rng = random.Random(0)

    def fills(cands, room, image_room):
        return [(sum(c[1] for c in sub), -sum(c[2] for c in sub)) for n in range(len(cands) + 1)
                for sub in itertools.combinations(cands, n)
                if sum(c[1] for c in sub) <= room and sum(c[2] for c in sub) <= image_room]

    exact = 0
    for _ in range(300):
        cands = [(k, rng.randint(1, 30), rng.choice((0, 0, 1, 3))) for k in range(rng.randint(1, 9))]
        room, image_room = rng.randint(1, 80), rng.randint(0, 5)
        best = max(fills(cands, room, image_room))
        if best[0] == room:  # an exact fill: the search stops at the first candidate completing one
            exact += 1
            n = next(n for n in range(len(cands) + 1) if max(fills(cands[:n], room, image_room))[0] == room)
            best = max(fills(cands[:n], room, image_room))
        keys = fullest_subset(cands, room, image_room)
        chosen = [c for c in cands if c[0] in keys]
        assert keys == sorted(set(keys))
        assert sum(c[2] for c in chosen) <= image_room
        assert (sum(c[1] for c in chosen), -sum(c[2] for c in chosen)) == best
    assert 30 < exact < 270  # both cases were checked


def test_fullest_fills_rows_that_first_fit_leaves_short(tok):
    """Nine pieces of 20, 17 and 14 tokens (144) in three 48-token rows: first-fit decreasing puts
    20 + 20 in one row and 14 x 3 in another (40, 48, 42: 14 slots empty, a piece carried over);
    `fullest` finds 20 + 14 + 14 and 17 + 17 + 14: three full rows.
    Every document is still placed exactly once, within the token and image limits."""
    sizes = {20: "z " * 17, 17: "z " * 14, 14: "z " * 11}  # + bos, eos; the tokenizer makes one id a "z "
    docs = [_doc(tok, [Segment("text", True, text=sizes[n])], f"{n}.{i}")
            for i, n in enumerate([20, 14, 17, 20, 14, 17, 14, 14, 14])]
    assert [len(d.tokens) for d in docs] == [20, 14, 17, 20, 14, 17, 14, 14, 14]
    fills = {}
    for packing in ("first_fit", "fullest"):
        steps = _plan(docs, lookahead=3.0, packing=packing)
        rows = [row for rows in steps for row in rows]
        assert sorted(d.source for row in rows for d, _, _ in row) == sorted(d.source for d in docs)
        assert all(sum(e - s for _, s, e in row) <= CFG.seq_len for row in rows)
        fills[packing] = [sum(e - s for _, s, e in row) for row in steps[0]]
    assert fills["fullest"] == [48, 48, 48]
    assert fills["first_fit"] == [40, 48, 42]


def test_auto_packing_is_fullest_up_to_its_row_limit_and_a_bad_name_is_refused():
    """data.packing=auto: `fullest` while the global plan's rows (dp x B) keep its host cost small, first-fit
    above; explicit choices stay as they are; an unknown name is refused with the choices."""
    from data_pipeline.config import FULLEST_MAX_ROWS, resolve_packing
    assert resolve_packing("auto", 16) == resolve_packing("auto", FULLEST_MAX_ROWS) == "fullest"
    assert resolve_packing("auto", FULLEST_MAX_ROWS + 1) == "first_fit"
    assert resolve_packing("fullest", 10 * FULLEST_MAX_ROWS) == "fullest"
    assert resolve_packing("first_fit", 4) == "first_fit"
    with pytest.raises(ValueError, match="packing='best'.*auto"):
        DataConfig(local="x", packing="best")
