"""Quality of a trained checkpoint on Fashion-MNIST (or digits), the figures of the train issue:

  (a) samples for each of the 10 class prompts, judged by a CNN trained on the REAL training split
      (its own test accuracy is printed and must be >= 0.88);
  (b) understanding: the greedy answer to "What is this?" on held-out images names the right class;
  (c) held-out bits/dim (and text loss) on the test split;
  (d) with --docs N: generated interleaved documents whose captions name what the classifier sees
      in the generated image before them.

    python tools/eval_quality.py --checkpoint runs/default [--samples 10 --images 200 --docs 20 --guidance 2]

Writes report.json, report.txt and samples.png into --out (default: the run directory).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (newest checkpoint)")
    ap.add_argument("--out", default=None, help="where to write the report (default: the run directory)")
    ap.add_argument("--samples", type=int, default=10, help="samples per class prompt")
    ap.add_argument("--images", type=int, default=200, help="held-out images for understanding")
    ap.add_argument("--docs", type=int, default=0, help="interleaved documents for (d) caption consistency")
    ap.add_argument("--guidance", type=float, default=None, help="guidance weight (default: the run's)")
    ap.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the run's)")
    ap.add_argument("--skip-understanding", action="store_true", help="only (a) and (c)")
    ap.add_argument("--eval-batches", type=int, default=None, help="held-out batches for bits/dim")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", choices=["sequential", "jacobi"], default="sequential",
                    help="flow sampling: sequential (exact; CUDA graphs on a GPU) or jacobi (parallel iteration)")
    ap.add_argument("--tol", type=float, default=1e-4, help="--method jacobi: largest change at which it stops")
    ap.add_argument("--jacobi-chunk", type=int, default=64, help="--method jacobi: tokens updated together")
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (eager decode steps)")
    args = ap.parse_args(argv)
    sampling = {"method": args.method, "tol": args.tol, "chunk": args.jacobi_chunk,
                "graphs": False if args.no_graphs else None}
    from megaflow.inference import load_for_inference
    from megaflow.quality import write_report
    from megaflow.train import evaluate, load_run_tokenizer, pick_dtype
    model, tok, cfg, ckpt = load_for_inference(args.checkpoint, args.device)
    t = cfg.train
    t = dataclasses.replace(t, report_samples=args.samples,
                            guidance=t.guidance if args.guidance is None else args.guidance,
                            sample_temperature=t.sample_temperature if args.temperature is None else args.temperature,
                            report_images=0 if args.skip_understanding else args.images,
                            report_docs=0 if args.skip_understanding else args.docs,
                            eval_batches=args.eval_batches or t.eval_batches)
    cfg = dataclasses.replace(cfg, train=t)
    out = Path(args.out) if args.out else ckpt.parent.parent
    out.mkdir(parents=True, exist_ok=True)

    class _Mon:  # carries the held-out figures into the report
        last_eval = {}

        def image_grid(self, *a):
            pass

    mon = _Mon()
    if t.eval_data and Path(t.eval_data, "index.json").is_file():
        from data_pipeline.loader import build_loader
        loader = build_loader(dataclasses.replace(cfg.data, local=t.eval_data, shuffle=False), tok, 0, 1)
        mon.last_eval = evaluate(model, loader, cfg, torch.device(args.device), pick_dtype(t.dtype, torch.device(args.device)), t.eval_batches)
        loader.close()
    res = write_report(model, tok, cfg, out, torch.device(args.device), mon, sampling)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
