"""`megaflow generate` on the tiny trained checkpoint (configs/tiny.yaml: 8x8 digits, context 128),
and the clear errors (exit code 2, message naming the value) of bad inputs to train and generate."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megaflow import generate_cli
from megaflow.inference import load_for_inference
from megaflow.model.generate import generate, sample_text
from tests.train.conftest import TINY


def gen(capsys, *args) -> tuple:
    rc = generate_cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_to_image_writes_pngs_of_the_model_size_deterministically(tiny_run, tmp_path, capsys):
    """Contract: --prompt with --num 3 writes image_000..002.png at the model's 8x8 grayscale size
    (times --scale) plus grid.png, and prints their paths; the same --seed gives byte-identical
    files, another seed different images."""
    rc, out, err = gen(capsys, "--checkpoint", tiny_run, "--prompt", "a photo of a seven", "--num", 3,
                       "--out", tmp_path / "a", "--seed", 3, "--guidance", 1.5)
    assert rc == 0, err
    names = [f"image_{i:03d}.png" for i in range(3)] + ["grid.png"]
    assert out.split() == [str(tmp_path / "a" / n) for n in names]
    for n in names[:3]:
        with Image.open(tmp_path / "a" / n) as im:
            assert (im.size, im.mode) == ((8, 8), "L")
    with Image.open(tmp_path / "a" / "grid.png") as im:
        assert im.size == (24, 8)
    assert gen(capsys, "--checkpoint", tiny_run, "--prompt", "a photo of a seven", "--num", 3, "--out",
               tmp_path / "b", "--seed", 3, "--guidance", 1.5)[0] == 0
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert gen(capsys, "--checkpoint", tiny_run, "--prompt", "a photo of a seven", "--num", 3, "--out",
               tmp_path / "c", "--seed", 4, "--guidance", 1.5, "--scale", 2)[0] == 0
    with Image.open(tmp_path / "c" / "image_000.png") as im:
        assert im.size == (16, 16)
    a = [np.asarray(Image.open(tmp_path / "a" / n)) for n in names[:3]]
    c = [np.asarray(Image.open(tmp_path / "c" / n))[::2, ::2] for n in names[:3]]
    assert any(not np.array_equal(x, y) for x, y in zip(a, c)), "another seed gave the same images"


def test_jacobi_method_samples_the_sequential_images(tiny_run, tmp_path, capsys):
    """--method jacobi (--tol 0: every window iterated until exact) writes the images --method
    sequential writes, to within one 8-bit level, and reports its iterations; a zero
    --jacobi-chunk is a clear error."""
    base = ["--checkpoint", tiny_run, "--prompt", "a photo of a seven", "--num", 2, "--seed", 3, "--guidance", 1.5]
    rc, _, err = gen(capsys, *base, "--out", tmp_path / "s", "--method", "sequential")
    assert rc == 0 and "sampling: sequential" in err, err
    rc, _, err = gen(capsys, *base, "--out", tmp_path / "j", "--method", "jacobi", "--tol", 0, "--jacobi-chunk", 8)
    assert rc == 0 and "sampling: jacobi, iterations {'deep'" in err, err
    for n in ("image_000.png", "image_001.png"):
        s, j = (np.asarray(Image.open(tmp_path / d / n)).astype(int) for d in ("s", "j"))
        assert np.abs(s - j).max() <= 1
    rc, _, err = gen(capsys, *base, "--out", tmp_path / "x", "--method", "jacobi", "--jacobi-chunk", 0)
    assert rc == 2 and "--jacobi-chunk=0" in err, err


def test_image_to_text_reads_the_image_like_the_data_pipeline(tiny_run, tmp_path, capsys):
    """Contract: --image (here a 6x5 RGBA PNG, converted to grayscale and centre-padded to 8x8 as the
    data pipeline does) prints exactly the answer that sample_text gives for [bos, image,
    "What is this?"] on the image as data_pipeline decodes it; greedy by default, seeded otherwise."""
    from data_pipeline.schema import decode_image, encode_image
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(rgba, "RGBA").save(path)
    rc, out, err = gen(capsys, "--checkpoint", tiny_run, "--image", path, "--max-new-tokens", 6)
    assert rc == 0, err

    model, tok, cfg, _ = load_for_inference(tiny_run)
    seg, blob = encode_image(Image.open(path))
    pixels = torch.tensor(decode_image(seg, blob, cfg.data)).float() / 127.5 - 1.0  # (1, 8, 8)
    ids = sample_text(model, [[tok.bos_id, pixels] + tok.encode("What is this?")], max_new_tokens=6)[0]
    assert len(ids) >= 1
    assert out == tok.decode(ids) + "\n"

    sampled = [gen(capsys, "--checkpoint", tiny_run, "--image", path, "--temperature", 1.0, "--seed", 5,
                   "--max-new-tokens", 6)[1] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_interleaved_continues_with_text_and_images(tiny_run, tmp_path, capsys):
    """Contract: --interleaved prints the document (prompt, generated text, and `[image PATH]` for each
    generated image, which is written as a PNG) exactly as generate() continues it; the tiny model
    has learnt that an image follows "Here are some pictures.", so greedy decoding draws at least
    one; the same seed gives the same document and images."""
    prompt = "Here are some pictures."
    rc, out, err = gen(capsys, "--checkpoint", tiny_run, "--interleaved", prompt, "--temperature", 0,
                       "--max-new-tokens", 12, "--out", tmp_path / "a")
    assert rc == 0, err
    doc = out.splitlines()[0]
    assert doc.startswith(prompt)
    images = sorted((tmp_path / "a").glob("image_*.png"))
    assert len(images) >= 1 and doc.count("[image ") == len(images)
    assert out.splitlines()[1] == str(tmp_path / "a" / "grid.png")

    model, tok, cfg, _ = load_for_inference(tiny_run)
    segs = generate(model, [tok.bos_id] + tok.encode(prompt), max_new_tokens=12, temperature=0.0,
                    guidance=cfg.train.guidance, seed=0, max_images=cfg.data.max_images)
    drawn = [s for s in segs if isinstance(s, torch.Tensor)]
    assert len(drawn) == len(images)
    first = np.asarray(Image.open(images[0]))
    assert np.array_equal(first, ((drawn[0][0].clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy())

    rc, again, _ = gen(capsys, "--checkpoint", tiny_run, "--interleaved", prompt, "--temperature", 0,
                       "--max-new-tokens", 12, "--out", tmp_path / "b")
    assert again.replace(str(tmp_path / "b"), str(tmp_path / "a")) == out
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in images)


# ----- bad input ----------------------------------------------------------------------------------------
def test_missing_and_corrupt_checkpoints_are_clear_errors(tiny_run, tmp_path, capsys):
    """Contract: a checkpoint path that does not exist, a model.pt truncated after the save, and a
    checkpoint without meta.json each exit 2 with a message naming the path / the file."""
    rc, _, err = gen(capsys, "--checkpoint", tmp_path / "nowhere", "--prompt", "a photo of a one")
    assert rc == 2 and "no complete checkpoint found" in err and "nowhere" in err

    ckpt = tmp_path / "step_000060"
    shutil.copytree(tiny_run / "checkpoints" / "step_000060", ckpt)
    model_pt = ckpt / "model.pt"
    model_pt.write_bytes(model_pt.read_bytes()[: model_pt.stat().st_size // 2])
    rc, _, err = gen(capsys, "--checkpoint", ckpt, "--prompt", "a photo of a one")
    assert rc == 2 and "model.pt" in err and "truncated or corrupt" in err, err

    (ckpt / "meta.json").unlink()
    rc, _, err = gen(capsys, "--checkpoint", ckpt, "--prompt", "a photo of a one")
    assert rc == 2 and "incomplete: no meta.json" in err, err


def test_bad_images_are_clear_errors(tiny_run, tmp_path, capsys):
    """Contract: --image naming a missing file, or a file that is not an image, exits 2 naming it."""
    rc, _, err = gen(capsys, "--checkpoint", tiny_run, "--image", tmp_path / "missing.png")
    assert rc == 2 and "missing.png" in err and "does not exist" in err
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    rc, _, err = gen(capsys, "--checkpoint", tiny_run, "--image", bad)
    assert rc == 2 and "notes.png" in err and "not a readable image" in err


def test_prompts_longer_than_the_context_are_clear_errors(tiny_run, tmp_path, capsys):
    """Contract: the context is the run's data.seq_len (128). A text->image prompt needs
    len(prompt) + N + 2 positions (N = 16 here); one that does not fit exits 2 saying how many tokens
    it has, how many positions it needs and the limit. Same for --interleaved and --question."""
    from megaflow.inference import load_checkpoint_tokenizer
    from megaflow.checkpoint import resolve
    tok = load_checkpoint_tokenizer(resolve(tiny_run))
    long = "seven " * 40
    n = len(tok.encode(long))
    assert n + 1 + 16 + 2 > 128
    rc, _, err = gen(capsys, "--checkpoint", tiny_run, "--prompt", long)
    assert rc == 2 and f"is {n} tokens" in err and f"= {n + 19} positions" in err and "is 128" in err, err
    assert f"at most {n - (n + 19 - 128)} tokens" in err

    fits = "seven " * 20  # the limit applies to the prompt, not to a fixed character count
    assert len(tok.encode(fits)) + 19 <= 128
    assert gen(capsys, "--checkpoint", tiny_run, "--prompt", fits, "--num", 1, "--out", tmp_path)[0] == 0

    rc, _, err = gen(capsys, "--checkpoint", tiny_run, "--interleaved", "seven " * 70)
    assert rc == 2 and "--interleaved" in err and "is 128" in err
    img = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(img)
    rc, _, err = gen(capsys, "--checkpoint", tiny_run, "--image", img, "--question", "seven " * 40)
    assert rc == 2 and "--question" in err and "is 128" in err


def test_unknown_config_key_exits_2_naming_the_key(capsys):
    """Contract: `megaflow train --set train.nope=1` (and a nested unknown key) exit 2 before any work,
    naming the key and listing the valid ones."""
    from megaflow.cli import main
    assert main(["train", "--config", str(TINY), "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.nope'" in err and "steps" in err
    assert main(["train", "--config", str(TINY), "--set", "model.flow.depth=3"]) == 2
    assert "'model.flow.depth'" in capsys.readouterr().err
