"""The MDS sample schema of an interleaved text+image document, and its decoding.

One MDS sample = one document = an ordered list of segments, each text or an image. Columns:
  segments  json   [{"kind": "text", "text": str, "loss": bool},
                    {"kind": "image", "format": "png"|"jpeg"|"raw", "shape": [H, W, C], "loss": bool}, ...]
  images    bytes  the images of the image segments, in order: uint32 count, count x uint32 byte
                   lengths, then the blobs (encoded PNG/JPEG, or raw uint8 H*W*C in C order)
  meta      json   {"source": str, "task": "t2i"|"i2t"|"interleaved"|..., "labels": [int], ...}
docs/DATA.md is the user-facing description. This file does not tokenize or pack.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_pipeline.config import DataConfig

COLUMNS = {"segments": "json", "images": "bytes", "meta": "json"}
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


class BadSampleError(ValueError):
    """A sample (or shard) that cannot be read; the message names the shard and sample index."""


@dataclass
class Segment:
    """A decoded segment: text, or an image as uint8 (C, H, W) at the configured size."""

    kind: str
    loss: bool
    text: str = ""
    pixels: np.ndarray | None = None


# -- writing ----------------------------------------------------------------------------------
def encode_image(image, image_format: str = "png") -> tuple[dict, bytes]:
    """A segment dict and its blob for a PIL image or a uint8 HxW / HxWxC array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array dtype {image.dtype}; expected uint8")
        array = image if image.ndim == 3 else image[:, :, None]
    else:
        array = np.asarray(image)
        array = array if array.ndim == 3 else array[:, :, None]
    height, width, channels = array.shape
    seg = {"kind": "image", "format": image_format, "shape": [height, width, channels], "loss": True}
    if image_format == "raw":
        return seg, np.ascontiguousarray(array).tobytes()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(array[:, :, 0] if channels == 1 else array)
    buf = io.BytesIO()
    pil.save(buf, format={"png": "PNG", "jpeg": "JPEG"}[image_format])
    return seg, buf.getvalue()


def pack_blobs(blobs: list[bytes]) -> bytes:
    """uint32 count, uint32 lengths, blobs."""
    header = struct.pack(f"<I{len(blobs)}I", len(blobs), *map(len, blobs))
    return header + b"".join(blobs)


def unpack_blobs(data: bytes) -> list[bytes]:
    """Inverse of `pack_blobs`; raises ValueError on a malformed buffer."""
    (count,) = struct.unpack_from("<I", data, 0)
    if 4 + 4 * count > len(data):
        raise ValueError(f"image blob header claims {count} images in {len(data)} bytes")
    lengths = struct.unpack_from(f"<{count}I", data, 4)
    offset, blobs = 4 + 4 * count, []
    for length in lengths:
        blobs.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ValueError(f"image blob lengths sum to {offset} bytes but the column has {len(data)}")
    return blobs


def make_sample(segments: list, meta: dict, image_format: str = "png") -> dict:
    """An MDS sample from segments given as str (text), PIL/ndarray (image), or (item, loss) pairs."""
    seg_dicts, blobs = [], []
    for item in segments:
        item, loss = item if isinstance(item, tuple) else (item, True)
        if isinstance(item, str):
            seg_dicts.append({"kind": "text", "text": item, "loss": bool(loss)})
        else:
            seg, blob = encode_image(item, image_format)
            seg["loss"] = bool(loss)
            seg_dicts.append(seg)
            blobs.append(blob)
    if not seg_dicts:
        raise ValueError(f"empty document (meta={json.dumps(meta)}): a document needs a segment")
    return {"segments": seg_dicts, "images": pack_blobs(blobs), "meta": meta}


# -- reading ----------------------------------------------------------------------------------
def _fit(pil: Image.Image, cfg: DataConfig) -> Image.Image:
    size = cfg.image_size
    if pil.size == (size, size):
        return pil
    if cfg.image_fit == "exact":
        raise ValueError(f"image is {pil.size[0]}x{pil.size[1]} but image_size={size} and image_fit='exact'")
    if cfg.image_fit == "pad" and pil.size[0] <= size and pil.size[1] <= size:
        canvas = Image.new(pil.mode, (size, size), 0)
        canvas.paste(pil, ((size - pil.size[0]) // 2, (size - pil.size[1]) // 2))
        return canvas
    return pil.resize((size, size), Image.Resampling.BICUBIC)


def _convert(pil: Image.Image, cfg: DataConfig) -> Image.Image:
    target = "L" if cfg.channels == 1 else "RGB"
    if pil.mode == target:
        return pil
    if cfg.image_mode == "exact" or pil.mode not in _EIGHT_BIT_MODES:
        raise ValueError(f"image mode {pil.mode!r} but channels={cfg.channels} needs {target!r}"
                         + ("" if pil.mode in _EIGHT_BIT_MODES else " (only 8-bit modes are read)"))
    if pil.mode in ("RGBA", "LA", "P"):
        rgba = pil.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(white, rgba)  # transparent emoji background -> white
    return pil.convert(target)


def decode_image(seg: dict, blob: bytes, cfg: DataConfig) -> np.ndarray:
    """uint8 (C, H, W) at cfg.image_size with cfg.channels; ValueError saying what is wrong."""
    if seg.get("format") == "raw":
        height, width, channels = seg["shape"]
        if len(blob) != height * width * channels:
            raise ValueError(f"raw image has {len(blob)} bytes, shape {seg['shape']} needs {height * width * channels}")
        if channels not in (1, 3, 4):
            raise ValueError(f"raw image has {channels} channels; expected 1, 3 or 4")
        array = np.frombuffer(blob, np.uint8).reshape(height, width, channels)
        pil = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    else:
        pil = Image.open(io.BytesIO(blob))
        pil.load()
    pil = _fit(_convert(pil, cfg), cfg)
    array = np.asarray(pil, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)  # (C, H, W)


def decode_sample(sample: dict, cfg: DataConfig, images: bool = True) -> list[Segment]:
    """Segments of an MDS sample, images decoded; ValueError on an empty or malformed document.
    `images=False` checks the structure only and leaves `pixels` None (the packer's length pass)."""
    segments = sample["segments"]
    if not isinstance(segments, list) or not segments:
        raise ValueError("empty document: no segments")
    blobs = unpack_blobs(sample["images"])
    n_images = sum(1 for s in segments if s.get("kind") == "image")
    if n_images != len(blobs):
        raise ValueError(f"{n_images} image segments but {len(blobs)} image blobs")
    out, image_index = [], 0
    for i, seg in enumerate(segments):
        kind, loss = seg.get("kind"), bool(seg.get("loss", True))
        if kind == "text":
            out.append(Segment("text", loss, text=str(seg["text"])))
        elif kind == "image":
            try:
                pixels = decode_image(seg, blobs[image_index], cfg) if images else None
            except Exception as err:
                raise ValueError(f"segment {i} (image {image_index}): {err}") from err
            out.append(Segment("image", loss, pixels=pixels))
            image_index += 1
        else:
            raise ValueError(f"segment {i} has kind {kind!r}; expected 'text' or 'image'")
    if all(s.kind == "text" and not s.text for s in out):
        raise ValueError("empty document: only empty text segments")
    return out
