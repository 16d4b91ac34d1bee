"""Benchmark the data loader: slot fill, documents/s and tokens/s, today's packer vs an older commit's.

  python tools/bench_loader.py [--limit 4096] [--workers 1 2] [--repeats 3] [--seq-len 512]
  python tools/bench_loader.py --config configs/h200_1b.yaml --data DIR --tokenizer DIR/../tokenizer.model \
      --steps 100 --workers 0 --repeats 1 --baseline 874d2f8 --samples-per-batch 48 --layouts layouts.json

Builds a Fashion-MNIST MDS subset once (into a temporary directory unless --data is given), then
reads batches through `build_loader` (decode PNG, tokenize, plan, pack) and reports, per worker
count, the median over --repeats passes of --steps batches (0 = a whole epoch). Slot fill = real
(non-pad) tokens / (B x T); real tokens/s counts those; dropped documents must be 0.
With `--config`, the data geometry (seq_len, batch_size, max_images, image size, lookahead) is the
config's. `--baseline COMMIT` also runs that commit's data_pipeline (exported with `git archive`
into a temporary directory, run in a subprocess) on the same data, with --samples-per-batch for the
old fixed-count packer, and prints both in one table. `--layouts FILE` writes, for the first
--steps batches of each, every row's document pieces as [length, image slots] lists: the real-data
layouts that tools/device/bench_packing_step.py replays on a GPU without the data pipeline.
It does not measure the model or any GPU transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row_layouts(batch) -> list:
    """[[length, image slots] of each document piece] of each row of a batch."""
    import torch
    out = []
    for doc, image in zip(batch["doc_ids"], batch["image_mask"]):
        pieces = []
        for d in torch.unique(doc[doc >= 0]).tolist():
            where = doc == d
            pieces.append([int(where.sum()), int((image & where).sum())])
        out.append(pieces)
    return out


def run_pass(fields: dict, steps: int, keep_layouts: bool) -> dict:
    """One pass of `steps` batches (0 = the epoch) with this checkout's (or PYTHONPATH's) loader."""
    from data_pipeline.config import DataConfig, TokenizerSpec
    from data_pipeline.loader import build_loader
    from data_pipeline.tokenizer import load_tokenizer
    fields = dict(fields)
    spec = TokenizerSpec(**fields.pop("tokenizer"))
    cfg = DataConfig(tokenizer=spec, **{k: v for k, v in fields.items() if k in DataConfig.__dataclass_fields__})
    tokenizer = load_tokenizer(spec)
    real = slots = images = batches = 0
    layouts = []
    with build_loader(cfg, tokenizer) as loader:
        start = time.perf_counter()
        for batch in loader:
            real += int((batch["doc_ids"] >= 0).sum())
            slots += batch["tokens"].numel()
            images += int(batch["image_valid"].sum())
            batches += 1
            if keep_layouts:
                layouts.append(row_layouts(batch))
            if steps and batches == steps:
                break
        seconds = time.perf_counter() - start
        stats = dict(loader.stats)
    dropped = stats.get("dropped_docs", stats.get("overflow_docs", 0))
    return {"seconds": seconds, "batches": batches, "docs": stats["docs"] - dropped, "real_tokens": real, "slots": slots,
            "images": images, "dropped_docs": dropped, "layouts": layouts}


def summarise(runs: list[dict]) -> dict:
    last = runs[-1]
    return {"batches": last["batches"], "docs": last["docs"], "docs_per_batch": last["docs"] / max(last["batches"], 1),
            "slot_fill": last["real_tokens"] / max(last["slots"], 1), "dropped_docs": last["dropped_docs"],
            "docs_per_s": statistics.median(r["docs"] / r["seconds"] for r in runs),
            "real_tokens_per_s": statistics.median(r["real_tokens"] / r["seconds"] for r in runs),
            "slots_per_s": statistics.median(r["slots"] / r["seconds"] for r in runs),
            "runs_s": [round(r["seconds"], 3) for r in runs]}


def baseline(commit: str, fields: dict, steps: int, repeats: int, keep_layouts: bool) -> list[dict]:
    """Run `commit`'s loader on the same data in a subprocess; returns its passes."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", REPO, "archive", commit, "data_pipeline"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]); "
                "from tools.bench_loader import run_pass; a = json.loads(sys.argv[3]); "
                "print(json.dumps([run_pass(a['fields'], a['steps'], a['keep']) for _ in range(a['repeats'])]))")
        job = json.dumps({"fields": fields, "steps": steps, "repeats": repeats, "keep": keep_layouts})
        out = subprocess.run([sys.executable, "-c", code, tree, REPO, job], check=True, capture_output=True,
                             text=True, cwd=tree)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="existing Fashion-MNIST MDS dir (default: build one)")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the mistral tokenizer)")
    parser.add_argument("--config", default=None, help="take the data geometry from this megaflow config")
    parser.add_argument("--limit", type=int, default=4096, help="documents to build")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="batches per pass (0 = a whole epoch)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lookahead", type=float, default=None, help="default: the config's, else 2.0")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of --config, e.g. --set data.max_images=16")
    parser.add_argument("--baseline", default=None, help="git commit whose loader to run too (the 'before')")
    parser.add_argument("--samples-per-batch", type=int, default=28, help="the baseline's fixed documents per batch")
    parser.add_argument("--layouts", default=None, help="write the batches' row layouts (JSON) here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from data_pipeline.writers import build_dataset
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or build_dataset("fashion_mnist", f"{tmp}/fashion", limit=args.limit)["out"]
        spec = {"kind": "sentencepiece", "path": args.tokenizer} if args.tokenizer else {"kind": "mistral", "path": ""}
        fields = dict(local=data, seq_len=args.seq_len, batch_size=args.batch_size, lookahead=2.0,
                      image_size=32, channels=1, patch_size=4, image_fit="pad", max_images=8, shuffle=True,
                      num_canonical_nodes=1, tokenizer=spec)
        if args.config:
            from megaflow.config import load_config
            d = load_config(args.config, args.overrides).data
            fields.update(seq_len=d.seq_len, batch_size=d.batch_size, max_images=d.max_images, lookahead=d.lookahead,
                          image_size=d.image_size, channels=d.channels, patch_size=d.patch_size,
                          image_fit=d.image_fit, num_canonical_nodes=d.num_canonical_nodes, seed=d.seed,
                          packing=d.packing)
        if args.lookahead is not None:
            fields["lookahead"] = args.lookahead
        results, layouts = {}, {}
        for workers in args.workers:
            f = {**fields, "num_workers": workers}
            keep = args.layouts is not None and workers == args.workers[0]
            runs = [run_pass(f, args.steps, keep and i == 0) for i in range(args.repeats)]
            results[f"after w={workers}"] = summarise(runs)
            if keep:
                layouts["after"] = runs[0]["layouts"]
            if args.baseline:
                old = baseline(args.baseline, {**f, "samples_per_batch": args.samples_per_batch}, args.steps,
                               args.repeats, keep)
                results[f"before w={workers}"] = summarise(old)
                if keep:
                    layouts["before"] = old[0]["layouts"]
            for name in [k for k in results if k.endswith(f"w={workers}")]:
                print(json.dumps({name: results[name]}), flush=True)
    print(f"\n| loader (B={fields['batch_size']}, T={fields['seq_len']}, max_images={fields['max_images']}) | "
          "slot fill | docs/batch | docs/s | real tokens/s | dropped docs |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['slot_fill']:.3f} | {r['docs_per_batch']:.1f} | {r['docs_per_s']:.0f} | "
              f"{r['real_tokens_per_s']:.0f} | {r['dropped_docs']} |")
    if args.layouts:
        with open(args.layouts, "w") as f:
            from data_pipeline.tokenizer import load_tokenizer
            from data_pipeline.config import TokenizerSpec
            tokenizer = load_tokenizer(TokenizerSpec(**spec)).describe()
            json.dump({"config": args.config, "fields": {k: v for k, v in fields.items() if k != "local"},
                       "tokenizer": tokenizer, **layouts}, f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
