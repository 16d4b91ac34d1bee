"""`megaflow generate`: text->image, image->text and interleaved continuation from a checkpoint.

    megaflow generate --checkpoint runs/default --prompt "a photo of a sneaker" --num 8 --out outputs/sneakers
    megaflow generate --checkpoint runs/default --image shoe.png [--question "What is this?"]
    megaflow generate --checkpoint runs/default --interleaved "Here are some pictures." --out outputs/doc

--checkpoint takes a checkpoint directory (step_XXXXXX), a run's out_dir or its checkpoints/ folder
(the newest complete checkpoint is used). Config, tokenizer and weights all come from the checkpoint
(megaflow/inference.py); the KV-cached loops are megaflow/model/generate.py's (static KV caches, one-token
steps replayed as CUDA graphs on a GPU; --method jacobi inverts flow blocks by parallel iteration). Prompts use the
training data's formats: text->image is [bos, prompt text, image], image->text is
[bos, image, question, answer], an interleaved document is [bos, text, image, text, ...].
Generated images are written as PNGs (one per image, plus grid.png); texts and paths are printed.

This file parses and checks the inputs (context length, image files) and writes the outputs; it
does not evaluate quality (tools/eval_quality.py) nor batch prompts from files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch


class InputError(ValueError):
    """A command-line input the model cannot take; the message names the value."""


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megaflow generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir, run out_dir, or its checkpoints/ folder")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="text->image: the caption, e.g. 'a photo of a sneaker'")
    mode.add_argument("--image", help="image->text: a PNG/JPEG file, brought to the model's size like the data")
    mode.add_argument("--interleaved", help="continue an interleaved document starting with this text")
    ap.add_argument("--question", default=None, help="image->text: the text after the image (default 'What is this?', "
                                                     "the training data's question)")
    ap.add_argument("--num", type=int, default=4, help="text->image: images to sample for the prompt")
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance weight of images (default: the run's train.guidance; 0 = off)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="text sampling temperature, 0 = greedy (default: 0 for --image, 1 for --interleaved)")
    ap.add_argument("--image-temperature", type=float, default=1.0, help="scale of the flow's noise when sampling images")
    ap.add_argument("--seed", type=int, default=0, help="seed of all sampling: the same seed gives the same output")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="text tokens to generate at most (default 32 for --image, 64 for --interleaved; "
                         "capped by the context left)")
    ap.add_argument("--out", default="outputs/generate", help="directory for the PNGs")
    ap.add_argument("--scale", type=int, default=1, help="upscale PNGs by this integer factor (nearest neighbour)")
    ap.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    ap.add_argument("--method", choices=["sequential", "jacobi"], default="sequential",
                    help="how flow blocks are inverted: 'sequential' (one token per step, the exact reference; "
                         "replayed as CUDA graphs on a GPU) or 'jacobi' (windows of tokens updated in parallel "
                         "until the largest change is <= --tol; faster only where the model converges in few "
                         "iterations: docs/benchmarks.md)")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="--method jacobi: stop when no latent moves more than this")
    ap.add_argument("--jacobi-chunk", type=int, default=64, help="--method jacobi: tokens updated together")
    ap.add_argument("--no-graphs", action="store_true", help="run decode steps eagerly, without CUDA graphs")
    ap.add_argument("--no-compile", action="store_true",
                    help="capture decode steps without compiling their layers first (torch.compile is on by "
                         "default where steps are captured as CUDA graphs: it costs seconds once per shape)")
    args = ap.parse_args(argv)
    if args.num < 1:
        raise InputError(f"--num={args.num} must be >= 1")
    if args.scale < 1:
        raise InputError(f"--scale={args.scale} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.jacobi_chunk < 1 or not args.tol >= 0:
        raise InputError(f"--jacobi-chunk={args.jacobi_chunk} must be >= 1 and --tol={args.tol} >= 0")
    return args


def sampling_options(args) -> dict:
    """The flow-sampling keywords of megaflow.model.generate (graphs: None = on where CUDA allows)."""
    return {"method": args.method, "tol": args.tol, "chunk": args.jacobi_chunk,
            "graphs": False if args.no_graphs else None}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device={name} but no CUDA device is available; use --device cpu")
    return torch.device(name)


# ----- inputs -----------------------------------------------------------------------------------------
def read_image(path: str, data_cfg) -> torch.Tensor:
    """An image file -> (C, H, W) float in [-1, 1], converted and padded/resized exactly as the data
    pipeline does for the run's data config (data_pipeline/schema.py)."""
    from PIL import Image, UnidentifiedImageError

    from data_pipeline.schema import _convert, _fit
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--image {path!r} does not exist (or is not a file)")
    try:
        with Image.open(p) as pil:
            pil.load()
            pil = _fit(_convert(pil, data_cfg), data_cfg)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise InputError(f"--image {path!r} is not a readable image file ({e})") from e
    except ValueError as e:  # a mode or size the run's data config refuses
        raise InputError(f"--image {path!r}: {e}") from e
    import numpy as np
    arr = np.asarray(pil, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
    return torch.from_numpy(arr.copy()).float() / 127.5 - 1.0


def check_fits(what: str, text: str, n_tokens: int, needed: str, n_needed: int, limit: int) -> None:
    """InputError unless `n_needed` positions (`needed` says how they add up) fit in the context."""
    if n_needed > limit:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise InputError(f"{what} {shown!r} is {n_tokens} tokens; {needed} = {n_needed} positions, but the model's "
                         f"context (data.seq_len of the run) is {limit}: shorten it to at most "
                         f"{n_tokens - (n_needed - limit)} tokens")


# ----- outputs ----------------------------------------------------------------------------------------
def image_grid(images: list, per_row: int = 8) -> torch.Tensor:
    """Images (C, H, W) in [-1, 1] -> one grid (C, rows*H, cols*W) in [0, 1], blank cells black."""
    cols = min(per_row, len(images))
    rows = -(-len(images) // cols)
    C, H, W = images[0].shape
    grid = torch.zeros(C, rows * H, cols * W)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = (img.float().cpu() + 1) / 2
    return grid


def write_images(images: list, out: Path, scale: int) -> list:
    """image_000.png ... and grid.png under `out`; returns the paths written."""
    from megaflow.quality import save_png
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out / f"image_{i:03d}.png"
        save_png((img.float().cpu() + 1) / 2, path, scale=scale)
        paths.append(path)
    grid = out / "grid.png"
    save_png(image_grid(images), grid, scale=scale)
    return paths + [grid]


# ----- the three modes --------------------------------------------------------------------------------
def text_to_image(model, tok, cfg, args, guidance: float) -> list:
    from megaflow.model.generate import sample_images
    N = model.cfg.fae.n_tokens
    prompt = [tok.bos_id] + tok.encode(args.prompt)
    check_fits("--prompt", args.prompt, len(prompt) - 1,
               f"text->image needs bos + {len(prompt) - 1} + image start + {N} image tokens + image end",
               len(prompt) + N + 2, cfg.data.seq_len)
    images, dec = sample_images(model, [prompt] * args.num, guidance=guidance, temperature=args.image_temperature,
                                seed=args.seed, **sampling_options(args))
    print(f"sampling: {args.method}, iterations {dec.stats}", file=sys.stderr)
    return list(images)


def image_to_text(model, tok, cfg, args, device) -> str:
    from megaflow.model.generate import sample_text
    if model.lm_head is None:
        raise InputError("--image needs a model with a language-model head; this checkpoint is TarFlow-only "
                         "(model.vlm is null): it can only do --prompt")
    N = model.cfg.fae.n_tokens
    image = read_image(args.image, cfg.data).to(device)
    args.question = "What is this?" if args.question is None else args.question
    question = tok.encode(args.question)
    used = 1 + N + 2 + len(question)
    check_fits("--question", args.question, len(question),
               f"image->text needs bos + {N + 2} (the image) + {len(question)} + at least 1 answer token",
               used + 1, cfg.data.seq_len)
    budget = min(args.max_new_tokens or 32, cfg.data.seq_len - used)
    temperature = 0.0 if args.temperature is None else args.temperature
    ids = sample_text(model, [[tok.bos_id, image] + question], max_new_tokens=budget, temperature=temperature,
                      seed=args.seed, graphs=sampling_options(args)["graphs"])[0]
    return tok.decode(ids)


def interleaved(model, tok, cfg, args, guidance: float) -> list:
    """Returns the continuation as a list of str and image tensors."""
    from megaflow.model.generate import generate
    if model.lm_head is None:
        raise InputError("--interleaved needs a model with a language-model head; this checkpoint is TarFlow-only "
                         "(model.vlm is null): it can only do --prompt")
    N, limit = model.cfg.fae.n_tokens, cfg.data.seq_len
    prompt = [tok.bos_id] + tok.encode(args.interleaved)
    check_fits("--interleaved", args.interleaved, len(prompt) - 1,
               f"a continuation needs bos + {len(prompt) - 1} + at least 1 new token", len(prompt) + 1, limit)
    left = limit - len(prompt)
    # Each image takes N latent slots + image end beyond its image-start token; keep the whole
    # continuation inside the context the model was trained on.
    max_images = min(cfg.data.max_images, max(0, (left - 1) // (N + 1)))
    budget = min(args.max_new_tokens or 64, left - max_images * (N + 1))
    temperature = 1.0 if args.temperature is None else args.temperature
    segments = generate(model, prompt, max_new_tokens=budget, temperature=temperature,
                        image_temperature=args.image_temperature, guidance=guidance, seed=args.seed,
                        max_images=max_images, **sampling_options(args))
    out, ids = [], []
    for seg in segments:
        if isinstance(seg, torch.Tensor):
            out.append(tok.decode(ids))
            out.append(seg)
            ids = []
        else:
            ids.append(seg)
    out.append(tok.decode(ids))
    return [s for s in out if not (isinstance(s, str) and s == "")]


def run(args) -> int:
    from megaflow.inference import load_for_inference
    device = pick_device(args.device)
    if args.question is not None and args.image is None:
        raise InputError("--question goes with --image (image->text)")
    model, tok, cfg, ckpt = load_for_inference(args.checkpoint, device)
    guidance = cfg.train.guidance if args.guidance is None else args.guidance
    print(f"checkpoint: {ckpt}", file=sys.stderr)
    out = Path(args.out)
    if args.prompt is not None:
        images = text_to_image(model, tok, cfg, args, guidance)
        for path in write_images(images, out, args.scale):
            print(path)
    elif args.image is not None:
        print(image_to_text(model, tok, cfg, args, device))
    else:
        segments = interleaved(model, tok, cfg, args, guidance)
        images = [s for s in segments if isinstance(s, torch.Tensor)]
        paths = write_images(images, out, args.scale) if images else []
        text, k = [args.interleaved], 0
        for seg in segments:
            if isinstance(seg, torch.Tensor):
                text.append(f"[image {paths[k]}]")
                k += 1
            else:
                text.append(seg)
        print(" ".join(t.strip() for t in text if t.strip()))
        if paths:
            print(paths[-1])
    return 0


def main(argv: Optional[list] = None) -> int:
    from megaflow.checkpoint import CheckpointError
    from megaflow.config import ConfigError
    from megaflow.model.decoding import compile_steps
    try:
        args = parse_args(argv)
        with compile_steps("off" if args.no_compile else "auto"):
            return run(args)
    except (InputError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"megaflow generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
