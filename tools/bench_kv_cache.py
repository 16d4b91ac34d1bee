"""KV-cached vs uncached sampling of one image of 256 latent tokens (64x64 pixels, 4x4 patches)
after a short text prompt, with the default model widths. Prints the median times of several
repeats and their ratio; both paths produce the same image (checked, max abs diff printed).

    python tools/bench_kv_cache.py [--repeats 3] [--device cpu|cuda] [--guidance 0]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megaflow.model.config import FlowConfig, ModelConfig, SpecialTokens, VLMConfig
from megaflow.model.fae import FAEConfig
from megaflow.model.generate import sample_images
from megaflow.model.starflow import build_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = SpecialTokens(pad_id=250, bos_id=251, eos_id=252, boi_id=253, eoi_id=254, image_id=255)
    cfg = ModelConfig(vlm=VLMConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384),
                      flow=FlowConfig(dim=128, n_heads=4, ffn_dim=384, n_layers=4, ratio=1, n_shallow=2,
                                      shallow_layers=2, shallow_dim=64, shallow_heads=2),
                      fae=FAEConfig(mode="pixels", image_size=64, channels=1, patch_size=4), tokens=tokens)
    assert cfg.fae.n_tokens == 256
    model = build_model(cfg, device=args.device)
    with torch.no_grad():  # non-trivial flow: zero-initialised heads would make every step the identity
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    model.eval()
    prompt = [[tokens.bos_id, 5, 6, 7, 8]]

    def run(use_cache):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        img, _ = sample_images(model, prompt, guidance=args.guidance, seed=0, use_cache=use_cache, do_denoise=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, img

    run(True)  # warm-up
    cached = [run(True) for _ in range(args.repeats)]
    uncached = [run(False) for _ in range(args.repeats)]
    tc, tu = statistics.median(t for t, _ in cached), statistics.median(t for t, _ in uncached)
    diff = (cached[0][1] - uncached[0][1]).abs().max().item()
    print(f"device={args.device} image_tokens=256 guidance={args.guidance} repeats={args.repeats}")
    print(f"cached   median {tc:8.3f} s  ({256 / tc:7.1f} tokens/s)")
    print(f"uncached median {tu:8.3f} s  ({256 / tu:7.1f} tokens/s)")
    print(f"speed-up (uncached / cached): {tu / tc:.1f}x   max |cached - uncached| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
