"""Writers: emoji rendered from Noto Color Emoji, the generic folder converter, labels metadata,
and the build command; what they write reads back through the loader."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cli import main
from data_pipeline.config import DataConfig, TokenizerSpec
from data_pipeline.loader import build_loader
from data_pipeline.writers import (EMOJI_FONT, FASHION_MNIST_CLASSES, load_class_names, read_idx,
                                   render_emoji)
from tests.data_pipeline.helpers import check_batch


def _read_all(data_dir, tok, **kw):
    cfg = DataConfig(local=data_dir, seq_len=160, batch_size=4, image_size=16,
                     patch_size=4, max_images=4, num_canonical_nodes=1, shuffle=False,
                     tokenizer=TokenizerSpec(kind="mistral"), **kw)
    with build_loader(cfg, tok) as loader:
        batches = list(loader)
        for batch in batches:
            check_batch(batch, tok, cfg)
        return batches, dict(loader.stats)


@pytest.mark.skipif(not os.path.isfile(EMOJI_FONT), reason=f"{EMOJI_FONT} not found (fonts-noto-color-emoji)")
def test_emoji_render_and_build(tmp_path, tok):
    data = render_emoji(image_size=16)
    assert 1300 <= len(data.class_names) == len(set(data.class_names)) <= 1500
    assert data.images.shape[1:] == (16, 16, 4) and data.images[..., 3].max() == 255
    out = str(tmp_path / "emoji")
    assert main(["build", "emoji", "--out", out, "--limit", "12", "--image-size", "16"]) == 0
    batches, stats = _read_all(out, tok, channels=3, image_fit="exact")  # RGBA -> RGB on white
    assert stats["samples"] == 12 and stats["skipped"] == 0
    assert "grinning face" in load_class_names(out)


def test_folder_converter(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(src / "a.png")
    Image.fromarray(np.full((16, 16), 50, np.uint8)).save(src / "b.jpg")
    lines = [{"image": "a.png", "caption": "a grey square"},
             {"segments": [{"text": "Two pictures:"}, {"image": "a.png"}, {"text": "and"},
                           {"image": "b.jpg", "loss": False}], "meta": {"id": "doc2"}}]
    (src / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = str(tmp_path / "mds")
    assert main(["build", "folder", "--src", str(src), "--out", out]) == 0
    _, stats = _read_all(out, tok, image_fit="resize")
    assert stats["samples"] == 2 and stats["image_slots"] == 3 * 16
    with pytest.raises(FileExistsError, match="not empty"):
        main(["build", "folder", "--src", str(src), "--out", out])
    (src / "captions.jsonl").write_text('{"image": "missing.png", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"captions.jsonl:1: image .*missing.png not found"):
        main(["build", "folder", "--src", str(src), "--out", str(tmp_path / "other")])


def test_fashion_mnist_labels_and_tasks(fashion_dir, tok):
    assert load_class_names(fashion_dir) == FASHION_MNIST_CLASSES
    labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.max() == 9
    text = open(os.path.join(fashion_dir, "corpus.txt")).read()
    assert "What is this?" in text and "a photo of" in text and "Here are some pictures." in text


def test_digits_mix_and_build(tmp_path, tok):
    out = str(tmp_path / "digits")
    assert main(["build", "digits", "--out", out, "--limit", "10", "--mix", "i2t=1", "--image-format", "raw"]) == 0
    batches, stats = _read_all(out, tok, image_fit="resize")
    assert stats["samples"] == 10 and stats["image_slots"] == 10 * 16
    assert load_class_names(out)[3] == "three"
