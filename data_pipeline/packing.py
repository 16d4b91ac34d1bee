"""Tokenize interleaved documents and pack them into fixed-shape (B, T) batches with image slots.

Layout of one document: bos, then its segments in order (a text segment is its tokens; an image is
boi, `image_tokens` x image_id, eoi), then eos. A document longer than T (or with more images than
`max_images`) is cut into pieces at token boundaries that are never inside an image; each piece is
its own attention context (new doc_id, positions restart at 0, no target across the cut). Pieces
are placed first-fit-decreasing into B rows; what does not fit is dropped and counted (`overflow`).
The batch is a pure function of its documents, so a batch boundary is always a sample boundary.

This file knows nothing about Streaming, ranks or workers (data_pipeline/loader.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data_pipeline.config import DataConfig
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
    """What packing one batch did; summed by the loader for logs."""

    docs: int = 0
    pieces: int = 0
    overflow_docs: int = 0  # documents with at least one piece dropped for lack of room
    overflow_tokens: int = 0
    text_tokens: int = 0  # non-pad, non-image tokens placed
    image_slots: int = 0
    overflow_sources: list[str] = field(default_factory=list)

    def add(self, other: "PackStats") -> None:
        for name in ("docs", "pieces", "overflow_docs", "overflow_tokens", "text_tokens", "image_slots"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


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


def pack_documents(docs: list[TokenizedDoc], cfg: DataConfig, tokenizer: Tokenizer) -> tuple[dict, PackStats]:
    """The batch dict (see docs/DATA.md) for these documents, and what packing did."""
    B, T, M = cfg.batch_size, cfg.seq_len, cfg.max_images
    N = cfg.image_tokens
    stats = PackStats(docs=len(docs))
    pieces = []  # (length, order, doc, start, end, n_images)
    for doc in docs:
        for start, end in split_document(doc, T, M, N):
            n_images = sum(1 for s in doc.image_starts if start <= s < end)
            pieces.append((end - start, len(pieces), doc, start, end, n_images))
    stats.pieces = len(pieces)

    # First-fit decreasing on (tokens, images); ties keep document order -> deterministic.
    rows: list[list] = [[] for _ in range(B)]
    room, image_room = [T] * B, [M] * B
    dropped_docs = set()
    for piece in sorted(pieces, key=lambda p: (-p[0], p[1])):
        length, _, doc, _, _, n_images = piece
        for r in range(B):
            if room[r] >= length and image_room[r] >= n_images:
                rows[r].append(piece)
                room[r] -= length
                image_room[r] -= n_images
                break
        else:
            stats.overflow_tokens += length
            if id(doc) not in dropped_docs:
                dropped_docs.add(id(doc))
                stats.overflow_sources.append(doc.source)
    stats.overflow_docs = len(dropped_docs)

    tokens = torch.full((B, T), tokenizer.pad_id, dtype=torch.int64)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((B, T), dtype=torch.int64)
    doc_ids = torch.full((B, T), -1, dtype=torch.int64)
    image_mask = torch.zeros((B, T), dtype=torch.bool)
    images = torch.zeros((B, M, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.float32)
    image_valid = torch.zeros((B, M), dtype=torch.bool)
    for r, row in enumerate(rows):
        offset, n_row_images = 0, 0
        for doc_index, (length, _, doc, start, end, _) in enumerate(sorted(row, key=lambda p: p[1])):
            span = slice(offset, offset + length)
            piece_tokens = torch.from_numpy(doc.tokens[start:end])
            next_is_target = np.zeros(length, bool)
            next_is_target[:-1] = doc.is_target[start + 1 : end]  # no target across a piece's end
            next_tokens = np.full(length, IGNORE_INDEX, np.int64)
            next_tokens[:-1] = doc.tokens[start + 1 : end]
            tokens[r, span] = piece_tokens
            targets[r, span] = torch.from_numpy(np.where(next_is_target, next_tokens, IGNORE_INDEX))
            position_ids[r, span] = torch.arange(length)
            doc_ids[r, span] = doc_index
            image_mask[r, span] = piece_tokens == tokenizer.image_id
            for s, pixels in zip(doc.image_starts, doc.images):
                if start <= s < end:
                    images[r, n_row_images] = torch.from_numpy(np.array(pixels, np.float32)) / 127.5 - 1.0
                    image_valid[r, n_row_images] = True
                    n_row_images += 1
            offset += length
        stats.image_slots += int(image_mask[r].sum())
        stats.text_tokens += offset - int(image_mask[r].sum())
    batch = {
        "tokens": tokens,  # (B, T)
        "targets": targets,  # (B, T)
        "position_ids": position_ids,  # (B, T)
        "doc_ids": doc_ids,  # (B, T)
        "image_mask": image_mask,  # (B, T)
        "images": images,  # (B, max_images, C, H, W)
        "image_valid": image_valid,  # (B, max_images)
    }
    return batch, stats
