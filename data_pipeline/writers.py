"""Writers: real datasets that install offline -> interleaved-document MDS shards.

fashion_mnist (Debian dataset-fashion-mnist, IDX files), digits (scikit-learn load_digits), emoji
(Debian fonts-noto-color-emoji rendered with Pillow) and folder (a user's images + a JSONL). Each
writes MDS shards (schema: data_pipeline/schema.py), a `labels.json` with the class names when the
data has classes, and a `corpus.txt` of its texts (for `tokenizer train`). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.schema import COLUMNS, make_sample
from data_pipeline.streaming_compat import MDSWriter

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_RANGES = [(0x2190, 0x21FF), (0x2300, 0x23FF), (0x2460, 0x27BF), (0x2900, 0x2BFF),
                (0x3030, 0x303D), (0x3297, 0x3299), (0x1F000, 0x1FAFF)]
DEFAULT_MIX = {"t2i": 0.4, "i2t": 0.4, "interleaved": 0.2}
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabeledImages:
    """Images with class labels and the names of the classes."""

    images: np.ndarray  # (n, H, W) or (n, H, W, C) uint8
    labels: np.ndarray  # (n,) int
    class_names: list[str]
    source: str


# -- sources ----------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """An IDX (MNIST format) file, gzipped or not, as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str = FASHION_MNIST_DIR) -> LabeledImages:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (60k train / 10k test, 28x28 grayscale)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(images_path):
        raise FileNotFoundError(
            f"Fashion-MNIST not found at {images_path}; install it with "
            "`apt-get install dataset-fashion-mnist` or pass --src DIR")
    images = read_idx(images_path)
    labels = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    return LabeledImages(images, labels.astype(np.int64), FASHION_MNIST_CLASSES, "fashion_mnist")


def load_digits_images(split: str = "train") -> LabeledImages:
    """scikit-learn's 1,797 8x8 digits (values 0..16 -> 0..255); train = first 1,500, test = rest."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    part = slice(0, 1500) if split == "train" else slice(1500, None)
    return LabeledImages(images[part], digits.target[part].astype(np.int64), DIGIT_CLASSES, "digits")


def render_emoji(image_size: int = 32, font_path: str = EMOJI_FONT) -> LabeledImages:
    """Every single-codepoint emoji the font draws, as RGBA image_size^2, labelled by its name.

    Noto Color Emoji is a bitmap font with one strike, so it opens only at size 109; images are
    rendered there, cropped to a centred square and downscaled. A codepoint the font lacks draws
    nothing (empty bounding box) and is skipped.
    """
    if not os.path.isfile(font_path):
        raise FileNotFoundError(f"{font_path} not found; install `fonts-noto-color-emoji`")
    font = ImageFont.truetype(font_path, 109)
    images, names = [], []
    for first, last in EMOJI_RANGES:
        for code in range(first, last + 1):
            char = chr(code)
            name = unicodedata.name(char, "")
            if not name:
                continue
            canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((10, 10), char, font=font, embedded_color=True)
            box = canvas.getbbox()
            if box is None:
                continue
            side = max(box[2] - box[0], box[3] - box[1])
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            square = canvas.crop((cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side))
            images.append(np.asarray(square.resize((image_size, image_size), Image.Resampling.LANCZOS)))
            names.append(name.lower())
    return LabeledImages(np.stack(images), np.arange(len(names)), names, "emoji")


# -- documents --------------------------------------------------------------------------------
def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _noun(class_name: str) -> str:
    return class_name if class_name.isupper() else class_name.lower()


def labeled_documents(data: LabeledImages, limit: int | None, mix: dict[str, float], seed: int,
                      image_format: str = "png", images_per_doc: int = 3) -> Iterator[dict]:
    """MDS samples from labelled images: t2i pairs, i2t pairs and interleaved documents.

    t2i: "a photo of a sneaker" (prompt, no text loss) -> image.
    i2t: image (input) -> "What is this?" (no loss) -> "A sneaker." (loss).
    interleaved: images_per_doc images, each followed by "This is a sneaker." (all with loss).
    `limit` counts documents; images are used in order and wrap around. Deterministic for a seed.
    """
    rng = random.Random(seed)
    tasks, weights = zip(*sorted(mix.items()))
    n_docs = limit if limit is not None else len(data.labels)
    cursor = 0

    def take() -> tuple[np.ndarray, int]:
        nonlocal cursor
        index = cursor % len(data.labels)
        cursor += 1
        return data.images[index], int(data.labels[index])

    for doc_index in range(n_docs):
        task = rng.choices(tasks, weights)[0]
        if task == "t2i":
            image, label = take()
            noun = _noun(data.class_names[label])
            segments = [(f"a photo of {_article(noun)}", False), image]
            labels = [label]
        elif task == "i2t":
            image, label = take()
            noun = _noun(data.class_names[label])
            answer = _article(noun)
            segments = [(image, False), ("What is this?", False), (answer[0].upper() + answer[1:] + ".", True)]
            labels = [label]
        elif task == "interleaved":
            segments, labels = ["Here are some pictures."], []
            for _ in range(images_per_doc):
                image, label = take()
                segments += [image, f"This is {_article(_noun(data.class_names[label]))}."]
                labels.append(label)
        else:
            raise ValueError(f"unknown task {task!r} in mix; use t2i, i2t, interleaved")
        meta = {"source": data.source, "task": task, "labels": labels, "doc": doc_index}
        yield make_sample(segments, meta, image_format)


def folder_documents(src: str, jsonl: str | None = None, image_format: str = "keep") -> Iterator[dict]:
    """MDS samples from a folder of images plus a JSONL (default src/captions.jsonl).

    Each line is either {"image": "rel/path.png", "caption": "text"} (a caption -> image pair) or
    {"segments": [{"text": "..."} | {"image": "rel/path.png"}, ...]} (an interleaved document);
    any segment may carry "loss": false, any line "meta": {...}. Image paths are relative to src.
    image_format "keep" stores PNG/JPEG files' bytes as they are and re-encodes others to PNG.
    """
    jsonl = jsonl or os.path.join(src, "captions.jsonl")
    with open(jsonl, encoding="utf-8") as f:
        lines = f.readlines()
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{jsonl}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if "segments" in record:
            raw = record["segments"]
        elif "image" in record:
            raw = [{"text": record.get("caption", ""), "loss": False}, {"image": record["image"]}]
        else:
            raise ValueError(f"{where}: needs 'segments' or 'image' (+ 'caption')")
        segments = []
        for seg in raw:
            loss = bool(seg.get("loss", True))
            if "text" in seg:
                segments.append((str(seg["text"]), loss))
            elif "image" in seg:
                segments.append((_load_image(os.path.join(src, seg["image"]), where), loss))
            else:
                raise ValueError(f"{where}: segment {seg} has neither 'text' nor 'image'")
        if not segments:
            raise ValueError(f"{where}: empty document")
        meta = {"source": "folder", "line": line_no, **record.get("meta", {})}
        sample = make_sample(segments, meta, "png")
        if image_format == "keep":
            sample = _keep_original_bytes(sample, raw, src)
        yield sample


def _load_image(path: str, where: str) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {path} not found")
    image = Image.open(path)
    image.load()
    return image


def _keep_original_bytes(sample: dict, raw: list, src: str) -> dict:
    from data_pipeline.schema import pack_blobs, unpack_blobs

    blobs = unpack_blobs(sample["images"])
    image_segs = [s for s in sample["segments"] if s["kind"] == "image"]
    image_paths = [seg["image"] for seg in raw if "image" in seg]
    for k, (seg, path) in enumerate(zip(image_segs, image_paths)):
        with open(os.path.join(src, path), "rb") as f:
            data = f.read()
        kind = Image.open(io.BytesIO(data)).format
        if kind in ("PNG", "JPEG"):
            seg["format"] = kind.lower()
            blobs[k] = data
    sample["images"] = pack_blobs(blobs)
    return sample


# -- writing ----------------------------------------------------------------------------------
def write_mds(out: str, samples: Iterable[dict], shard_bytes: int = 1 << 26,
              class_names: list[str] | None = None) -> dict:
    """Write samples as MDS shards under `out` (+ labels.json, corpus.txt); returns a summary."""
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out (nothing is overwritten)")
    n, tasks = 0, {}
    with MDSWriter(out=out, columns=COLUMNS, compression=None, hashes=["xxh64"],
                   size_limit=shard_bytes, exist_ok=False) as writer, \
            open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as corpus:
        for sample in samples:
            writer.write(sample)
            for seg in sample["segments"]:
                if seg["kind"] == "text" and seg["text"]:
                    corpus.write(seg["text"].replace("\n", " ") + "\n")
            task = sample["meta"].get("task", "document")
            tasks[task] = tasks.get(task, 0) + 1
            n += 1
    if class_names is not None:
        with open(os.path.join(out, LABELS_FILE), "w", encoding="utf-8") as f:
            json.dump({"class_names": class_names,
                       "t2i_prompt": "a photo of {article_name}",
                       "i2t_question": "What is this?"}, f, indent=1, ensure_ascii=False)
    summary = {"out": out, "samples": n, "tasks": tasks}
    log.info("wrote %s", summary)
    return summary


def load_class_names(data_dir: str) -> list[str]:
    """Class names a writer recorded in data_dir/labels.json (index = label id in meta.labels)."""
    path = os.path.join(data_dir, LABELS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; only labelled datasets (fashion_mnist, digits, emoji) have one")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["class_names"]


SOURCES: dict[str, Callable[..., LabeledImages]] = {
    "fashion_mnist": lambda split, image_size, src: load_fashion_mnist(split, src or FASHION_MNIST_DIR),
    "digits": lambda split, image_size, src: load_digits_images(split),
    "emoji": lambda split, image_size, src: render_emoji(image_size or 32),
}


def build_dataset(name: str, out: str, split: str = "train", limit: int | None = None,
                  mix: dict[str, float] | None = None, seed: int = 0, image_size: int | None = None,
                  src: str | None = None, jsonl: str | None = None, shard_bytes: int = 1 << 26,
                  image_format: str = "png") -> dict:
    """Build dataset `name` (fashion_mnist, digits, emoji, folder) as MDS shards under `out`."""
    if name == "folder":
        if not src:
            raise ValueError("folder needs --src DIR (images + captions.jsonl)")
        samples = folder_documents(src, jsonl, "keep" if image_format == "png" else image_format)
        if limit is not None:
            samples = (s for i, s in zip(range(limit), samples))
        return write_mds(out, samples, shard_bytes)
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(SOURCES) + ['folder']}")
    data = SOURCES[name](split, image_size, src)
    if image_size and name != "emoji":
        resized = [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BICUBIC))
                   for im in data.images]
        data = LabeledImages(np.stack(resized), data.labels, data.class_names, data.source)
    if name == "emoji":  # emoji are shuffled so a --limit subset is not one Unicode block
        order = np.random.default_rng(seed).permutation(len(data.labels))
        data = LabeledImages(data.images[order], data.labels[order], data.class_names, data.source)
    samples = labeled_documents(data, limit, mix or DEFAULT_MIX, seed, image_format)
    return write_mds(out, samples, shard_bytes, data.class_names)
