"""Command line of the data pipeline; `megaflow data ...` forwards its arguments to `main(argv)`.

  python -m data_pipeline build NAME --out DIR [--split train|test] [--limit N] [--mix ...]
  python -m data_pipeline tokenizer train --corpus FILE --vocab N --out PATH
  python -m data_pipeline inspect DIR [--seq-len T ...]      (prints one packed batch)

NAME is fashion_mnist, digits, emoji or folder (folder needs --src DIR with captions.jsonl).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            mix[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix {text!r}: expected e.g. t2i=0.4,i2t=0.4,interleaved=0.2") from None
    return mix


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="write a dataset as MDS shards")
    build.add_argument("name", choices=["fashion_mnist", "digits", "emoji", "folder"])
    build.add_argument("--out", required=True, help="output directory (must be new or empty)")
    build.add_argument("--split", default="train", choices=["train", "test"])
    build.add_argument("--limit", type=int, default=None, help="number of documents to write")
    build.add_argument("--mix", type=_parse_mix, default=None,
                       help="task weights, default t2i=0.4,i2t=0.4,interleaved=0.2")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--image-size", type=int, default=None,
                       help="resize images when writing (emoji: render size, default 32)")
    build.add_argument("--src", default=None, help="folder: image root; fashion_mnist: IDX directory")
    build.add_argument("--jsonl", default=None, help="folder: JSONL (default SRC/captions.jsonl)")
    build.add_argument("--shard-bytes", type=int, default=1 << 26, help="shard size limit")
    build.add_argument("--image-format", default="png", choices=["png", "jpeg", "raw"])

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser("train", help="train a SentencePiece model on a text corpus")
    train.add_argument("--corpus", required=True, help="text file, one document per line")
    train.add_argument("--vocab", type=int, required=True, help="base vocabulary size")
    train.add_argument("--out", required=True, help="model path (.model)")
    train.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])

    inspect = sub.add_parser("inspect", help="print the first packed batch of a dataset")
    inspect.add_argument("data", help="MDS directory")
    inspect.add_argument("--tokenizer", default="mistral", help="'mistral', a .model path, or an HF dir")
    inspect.add_argument("--seq-len", type=int, default=256)
    inspect.add_argument("--batch-size", type=int, default=4)
    inspect.add_argument("--lookahead", type=float, default=2.0)
    inspect.add_argument("--image-size", type=int, default=32)
    inspect.add_argument("--channels", type=int, default=1)
    inspect.add_argument("--patch-size", type=int, default=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in argv (default sys.argv[1:]); returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        from data_pipeline.writers import build_dataset

        summary = build_dataset(args.name, args.out, split=args.split, limit=args.limit, mix=args.mix,
                                seed=args.seed, image_size=args.image_size, src=args.src,
                                jsonl=args.jsonl, shard_bytes=args.shard_bytes,
                                image_format=args.image_format)
        print(json.dumps(summary))
        return 0
    if args.command == "tokenizer":
        from data_pipeline.tokenizer import train_sentencepiece

        tokenizer = train_sentencepiece(args.corpus, args.vocab, args.out, args.model_type)
        print(json.dumps(tokenizer.describe()))
        return 0
    if args.command == "inspect":
        import os

        from data_pipeline.config import DataConfig, TokenizerSpec
        from data_pipeline.loader import build_loader, describe_batch
        from data_pipeline.tokenizer import load_tokenizer

        if args.tokenizer == "mistral":
            spec = TokenizerSpec(kind="mistral")
        else:
            spec = TokenizerSpec(kind="hf" if os.path.isdir(args.tokenizer) else "sentencepiece", path=args.tokenizer)
        tokenizer = load_tokenizer(spec)
        cfg = DataConfig(local=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                         lookahead=args.lookahead, image_size=args.image_size,
                         channels=args.channels, patch_size=args.patch_size, shuffle=False,
                         num_canonical_nodes=1, tokenizer=spec)
        with build_loader(cfg, tokenizer) as loader:
            batch = next(iter(loader))
            print(json.dumps(describe_batch(batch)))
            for row in range(batch["tokens"].shape[0]):
                print(f"row {row}: {tokenizer.decode(batch['tokens'][row])!r} "
                      f"images={int(batch['image_valid'][row].sum())}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
