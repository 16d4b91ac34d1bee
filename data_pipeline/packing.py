"""Tokenize interleaved documents and pack them into fixed-shape (B, T) batches with image slots.

Layout of one document: bos, then its segments in order (a text segment is its tokens; an image is
boi, `image_tokens` x image_id, eoi), then eos. A document longer than T (or with more images than
`max_images`) is cut into pieces at token boundaries that are never inside an image; each piece is
its own attention context (new doc_id, positions restart at 0, no target across the cut).

Two steps: `Planner` decides from document lengths alone which pieces go into which row of a step
(over a look-ahead of pending pieces, carrying what does not fit into a later step; nothing is
dropped): `fullest` gives each row the subset of pending pieces that fills it most (an exact
subset sum over tokens and images), `first_fit` is the earlier first-fit decreasing (kept so that
runs packed with it resume the same way); `build_batch` turns one rank's planned rows of decoded
documents into tensors.

This file knows nothing about Streaming, ranks or workers (data_pipeline/loader.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.config import PACKINGS, DataConfig
from data_pipeline.schema import Segment
from data_pipeline.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class TokenizedDoc:
    """One document as tokens, with what the packer needs to cut and mask it."""

    tokens: np.ndarray  # (L,) int64
    is_target: np.ndarray  # (L,) bool: may be predicted (text/bos/eos/boi/eoi of a loss-bearing segment)
    image_starts: list[int]  # position of each image's boi
    images: list[np.ndarray]  # each (C, H, W) uint8
    source: str  # "shard.00003.mds sample 17", for messages


@dataclass
class PackStats:
    """What building one batch did; summed by the loader for logs and result.json."""

    samples: int = 0  # documents started in this batch (first pieces, skipped ones included)
    docs: int = 0  # documents started and delivered (not skipped)
    pieces: int = 0  # document pieces placed
    skipped: int = 0  # bad samples skipped (skip_bad_samples=True)
    dropped_docs: int = 0  # documents with a piece that did not fit where planned: 0 by construction
    text_tokens: int = 0  # non-pad, non-image tokens placed
    image_slots: int = 0
    slots: int = 0  # B * T

    def add(self, other: "PackStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


Piece = tuple  # (sample_id, start, end, n_images): tokens [start, end) of one document; start == end: a skipped sample


def tokenize_document(segments: list[Segment], tokenizer: Tokenizer, image_tokens: int, source: str) -> TokenizedDoc:
    """bos + segments + eos as token ids, with target flags and image positions."""
    tokens, targets, image_starts, images = [tokenizer.bos_id], [False], [], []
    for seg in segments:
        if seg.kind == "text":
            ids = tokenizer.encode(seg.text)
            tokens += ids
            targets += [seg.loss] * len(ids)
        else:
            image_starts.append(len(tokens))
            images.append(seg.pixels)
            tokens += [tokenizer.boi_id] + [tokenizer.image_id] * image_tokens + [tokenizer.eoi_id]
            targets += [seg.loss] + [False] * image_tokens + [seg.loss]
    tokens.append(tokenizer.eos_id)
    targets.append(True)
    return TokenizedDoc(np.asarray(tokens, np.int64), np.asarray(targets, bool), image_starts, images, source)


def split_document(doc: TokenizedDoc, seq_len: int, max_images: int, image_tokens: int) -> list[tuple[int, int]]:
    """[start, end) pieces of at most seq_len tokens and max_images images, never cutting an image."""
    length, pieces, start = len(doc.tokens), [], 0
    blocks = [(s, s + image_tokens + 2) for s in doc.image_starts]  # [boi, eoi] spans
    while start < length:
        end = min(start + seq_len, length)
        inside = [b for b in blocks if start <= b[0] < end]
        if len(inside) > max_images:
            end = inside[max_images][0]
        for block_start, block_end in inside:
            if block_start < end < block_end:  # the cut would fall inside this image
                end = block_start
        if end <= start:  # cannot happen when image_tokens + 2 <= seq_len (DataConfig checks it)
            raise ValueError(f"{doc.source}: an image of {image_tokens + 2} slots does not fit in seq_len={seq_len}")
        pieces.append((start, end))
        start = end
    return pieces


def fullest_subset(candidates: list[tuple[int, int, int]], room: int, image_room: int) -> list[int]:
    """The keys of the subset of `candidates` (key, tokens, images) with the most tokens that fit
    `room` tokens and `image_room` images; among subsets of that many tokens the one with the fewest
    images, and the earliest candidates (a later one is taken only where an earlier one cannot give
    the same sum). Candidates are read in order and reading stops at the first that completes an
    exact fill (`room` tokens): the fewest images are then those of that prefix's exact fills. A
    subset sum over bitsets: reach[j] has bit s set when some subset of the candidates read so far
    holds s tokens and exactly j images."""
    full, top = (1 << (room + 1)) - 1, 1 << room
    reach = [1] + [0] * image_room
    history = []  # reach before each candidate read, to walk back
    exact = False
    for _, length, n_images in candidates:
        history.append(reach)
        reach = reach[:]
        for j in range(image_room - n_images, -1, -1):
            if history[-1][j]:
                reach[j + n_images] |= (history[-1][j] << length) & full
                exact = exact or bool(reach[j + n_images] & top)
        if exact:
            break
    best, images = max((bits.bit_length() - 1, -j) for j, bits in enumerate(reach) if bits)
    tokens, images, chosen = best, -images, []
    for (key, length, n_images), before in zip(reversed(candidates[:len(history)]), reversed(history)):
        if not (before[images] >> tokens) & 1:  # this sum needs this candidate
            chosen.append(key)
            tokens, images = tokens - length, images - n_images
    return chosen[::-1]


class Planner:
    """Packing of a document stream into steps of `rows` rows (all data-parallel ranks').

    Pending pieces are kept in stream order: what was carried over from earlier steps first, then
    new documents, pulled from `order` until the pending pieces hold `lookahead` x rows x seq_len
    tokens. Each step places the oldest pending piece first (in the first row); then
    - `fullest`: row by row, the subset of the pending pieces left that fills the row's tokens most
      within its image limit (`fullest_subset`; older pieces preferred among equal fills). Pieces
      of one (tokens, images) kind are interchangeable, so at most as many of a kind as fit a row
      are offered, and the search stops at an exact fill: ~3 ms a step on one core at h200_1b's 16 rows,
      linear in the rows;
    - `first_fit`: the others longest first, each into the first row with room for its tokens and
      images (first-fit decreasing; rows kept ~4% emptier on short documents).
    What does not fit stays pending in stream order, so a piece at position j (from 0) of the
    pending list is placed within j + 1 steps (nothing waits forever, nothing is dropped). A step
    is a pure function of (`next_index`, `carry`): that pair, with the packing, is the resume state.
    `measure(sample_id)` gives a document's pieces without decoding its images.
    """

    def __init__(self, order: list[int], measure, rows: int, seq_len: int, max_images: int,
                 lookahead: float, next_index: int = 0, carry: list = (), packing: str = "fullest") -> None:
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}; use one of {PACKINGS}")
        self.order, self.measure, self.rows, self.packing = order, measure, rows, packing
        self.seq_len, self.max_images = seq_len, max_images
        self.budget = max(1, int(lookahead * rows * seq_len))  # pending tokens to look at per step
        self.next_index, self.pending = next_index, [tuple(p) for p in carry]

    @property
    def done(self) -> bool:
        return self.next_index >= len(self.order) and not self.pending

    def _pull(self) -> None:
        tokens = sum(p[2] - p[1] for p in self.pending)
        while tokens < self.budget and self.next_index < len(self.order):
            pieces = self.measure(self.order[self.next_index])
            self.next_index += 1
            self.pending.extend(pieces)
            tokens += sum(p[2] - p[1] for p in pieces)

    def step(self) -> list[list[Piece]] | None:
        """The next step's rows (each a list of pieces in row order), or None at the epoch's end."""
        self._pull()
        if not self.pending:
            return None
        lengths = [p[2] - p[1] for p in self.pending]
        rows = self._fullest(lengths) if self.packing == "fullest" else self._first_fit(lengths)
        placed = {i for row in rows for i in row}
        out = [[self.pending[i] for i in row] for row in rows]
        self.pending = [p for i, p in enumerate(self.pending) if i not in placed]
        return out

    def _fullest(self, lengths: list[int]) -> list[list[int]]:
        """Rows of pending indices: the oldest piece (and every empty piece of a skipped sample)
        in the first row, then each row the fullest subset of what is left. The pieces left are
        kept by kind (tokens, images), each kind's in stream order, so a row's offer costs the same
        whatever the number of pending pieces (the plan of dp x B rows grows linearly)."""
        by_kind: dict[tuple, list[int]] = {}
        for i in range(1, len(lengths)):
            if lengths[i] > 0:
                by_kind.setdefault((lengths[i], self.pending[i][3]), []).append(i)
        rows = []
        for r in range(self.rows):
            row = [0] + [i for i in range(1, len(lengths)) if lengths[i] == 0] if r == 0 else []
            room = self.seq_len - sum(lengths[i] for i in row)
            image_room = self.max_images - sum(self.pending[i][3] for i in row)
            offered = sorted((i, *kind) for kind, ids in by_kind.items()  # older pieces first
                             for i in ids[:min(room // kind[0], image_room // kind[1] if kind[1] else room)])
            chosen = fullest_subset(offered, room, image_room) if offered else []
            for i in chosen:
                by_kind[(lengths[i], self.pending[i][3])].remove(i)
            rows.append(row + chosen)
        return rows

    def _first_fit(self, lengths: list[int]) -> list[list[int]]:
        """Rows of pending indices: the oldest piece first, then the longest first, each into the
        first row with room for its tokens and images (first-fit decreasing)."""
        rows: list[list[int]] = [[] for _ in range(self.rows)]
        room, image_room = [self.seq_len] * self.rows, [self.max_images] * self.rows
        open_rows = list(range(self.rows))
        shortest = max(min(lengths), 1)
        for i in [0] + sorted(range(1, len(self.pending)), key=lambda i: -lengths[i]):
            length, n_images = lengths[i], self.pending[i][3]
            for r in open_rows:
                if room[r] >= length and image_room[r] >= n_images:
                    rows[r].append(i)
                    room[r] -= length
                    image_room[r] -= n_images
                    if room[r] < shortest:
                        open_rows.remove(r)
                    break
            if not open_rows:
                break
        return rows

    def state(self) -> tuple[int, list]:
        """(next_index, carry): where the next step starts."""
        return self.next_index, [list(p) for p in self.pending]


def build_batch(rows: list[list[tuple[TokenizedDoc, int, int]]], cfg: DataConfig, tokenizer: Tokenizer) -> tuple[dict, PackStats]:
    """The batch dict (see docs/DATA.md) of B rows, each a list of (document, start, end) pieces
    placed in order, padded at the end; and what it holds. Filled as numpy arrays and handed over
    as tensors at the end (a few numpy slice writes per piece instead of torch ops: ~5x less CPU,
    which the loader's worker takes from the training threads' cores)."""
    B, T, M = cfg.batch_size, cfg.seq_len, cfg.max_images
    stats = PackStats(slots=B * T)
    tokens = np.full((B, T), tokenizer.pad_id, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    doc_ids = np.full((B, T), -1, dtype=np.int64)
    images = np.zeros((B, M, cfg.channels, cfg.image_size, cfg.image_size), dtype=np.float32)
    image_valid = np.zeros((B, M), dtype=bool)
    for r, row in enumerate(rows):
        offset, n_row_images, doc_index = 0, 0, 0
        for doc, start, end in row:
            length = end - start
            n_images = sum(1 for s in doc.image_starts if start <= s < end)
            if offset + length > T or n_row_images + n_images > M:  # a planning bug; never silent
                stats.dropped_docs += 1
                continue
            span = slice(offset, offset + length)
            tokens[r, span] = doc.tokens[start:end]
            # the next token where it may be predicted; no target across a piece's end
            targets[r, offset : offset + length - 1] = np.where(doc.is_target[start + 1 : end],
                                                                doc.tokens[start + 1 : end], IGNORE_INDEX)
            position_ids[r, span] = np.arange(length)
            doc_ids[r, span] = doc_index
            for s, pixels in zip(doc.image_starts, doc.images):
                if start <= s < end:
                    images[r, n_row_images] = np.asarray(pixels, np.float32) / np.float32(127.5) - np.float32(1.0)
                    image_valid[r, n_row_images] = True
                    n_row_images += 1
            offset += length
            doc_index += 1
            stats.pieces += 1
    image_mask = (tokens == tokenizer.image_id) & (doc_ids >= 0)  # placed image slots
    stats.image_slots = int(image_mask.sum())
    stats.text_tokens = int((doc_ids >= 0).sum()) - stats.image_slots
    batch = {
        "tokens": torch.from_numpy(tokens),  # (B, T)
        "targets": torch.from_numpy(targets),  # (B, T)
        "position_ids": torch.from_numpy(position_ids),  # (B, T)
        "doc_ids": torch.from_numpy(doc_ids),  # (B, T)
        "image_mask": torch.from_numpy(image_mask),  # (B, T)
        "images": torch.from_numpy(images),  # (B, max_images, C, H, W)
        "image_valid": torch.from_numpy(image_valid),  # (B, max_images)
    }
    return batch, stats
