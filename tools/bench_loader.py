"""Benchmark the data loader: samples/s and tokens/s on Fashion-MNIST with 1 and 2 DataLoader workers.

  python tools/bench_loader.py [--limit 4096] [--workers 1 2] [--repeats 5] [--seq-len 512]

Builds a Fashion-MNIST MDS subset once (into a temporary directory unless --data is given), then
reads whole epochs through `build_loader` (decode PNG, tokenize, pack) and reports the median of
--repeats epochs per worker count. tokens/s counts all B*T slots delivered; text tokens/s counts
non-pad, non-image tokens. It does not measure the model or any GPU transfer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from data_pipeline.config import DataConfig, TokenizerSpec
from data_pipeline.loader import build_loader
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.writers import build_dataset


def run_epoch(cfg: DataConfig, tokenizer) -> dict:
    with build_loader(cfg, tokenizer) as loader:
        start = time.perf_counter()
        n_batches = sum(1 for _ in loader)
        seconds = time.perf_counter() - start
        stats = loader.stats
    return {"seconds": seconds, "samples": stats["samples"], "batches": n_batches,
            "slots": n_batches * cfg.batch_size * cfg.seq_len, "text_tokens": stats["text_tokens"],
            "image_slots": stats["image_slots"], "overflow_docs": stats["overflow_docs"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="existing Fashion-MNIST MDS dir (default: build one)")
    parser.add_argument("--limit", type=int, default=4096, help="documents to build")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples-per-batch", type=int, default=28)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or build_dataset("fashion_mnist", f"{tmp}/fashion", limit=args.limit)["out"]
        tokenizer = load_tokenizer(TokenizerSpec(kind="mistral"))
        results = {}
        for workers in args.workers:
            cfg = DataConfig(local=data, seq_len=args.seq_len, batch_size=args.batch_size,
                             samples_per_batch=args.samples_per_batch, image_size=32, channels=1,
                             patch_size=4, image_fit="pad", max_images=8, num_workers=workers,
                             num_canonical_nodes=1, tokenizer=TokenizerSpec(kind="mistral"))
            runs = [run_epoch(cfg, tokenizer) for _ in range(args.repeats)]
            seconds = [r["seconds"] for r in runs]
            last = runs[-1]
            results[workers] = {
                "median_s": statistics.median(seconds),
                "samples_per_s": statistics.median(r["samples"] / r["seconds"] for r in runs),
                "tokens_per_s": statistics.median(r["slots"] / r["seconds"] for r in runs),
                "text_tokens_per_s": statistics.median(r["text_tokens"] / r["seconds"] for r in runs),
                "samples": last["samples"], "batches": last["batches"],
                "fill": (last["text_tokens"] + last["image_slots"]) / last["slots"],
                "overflow_docs": last["overflow_docs"], "runs_s": [round(s, 3) for s in seconds],
            }
            print(json.dumps({"workers": workers, **results[workers]}), flush=True)
    print("| workers | samples/s | tokens/s (B*T slots) | text tokens/s | epoch s (median) | fill |")
    print("|---|---|---|---|---|---|")
    for workers, r in results.items():
        print(f"| {workers} | {r['samples_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['text_tokens_per_s']:.0f} "
              f"| {r['median_s']:.2f} | {r['fill']:.2f} |")


if __name__ == "__main__":
    main()
