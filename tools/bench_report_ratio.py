"""CPU: the default run's 200 report samples, the code before issue 14 against today's, as a ratio
measured in ONE process (this machine is shared: separate runs drift by 2x; alternating the two
versions round by round and taking the median of the per-round ratios cancels most of that).

    python tools/bench_report_ratio.py [--baseline 874d2f8] [--rounds 5] [--threads 1]

The earlier code is `git archive`d from --baseline into a temporary directory and imported under its
own `megaflow` package, swapped into sys.modules while it runs (its lazy imports then find their
own modules). Both versions build configs/default.yaml's model (tools/bench_sampling.py, suite
report) with the same weights (the old model's state dict loads into today's); each round samples the report's
10 prompts x 20 images (guidance 6, temperature 0.8, the denoise step) with both, the order of the
two alternating, and checks that both sample the same images. Before: one sample_images call per
prompt (the old judge); after: megaflow.quality.sample_prompts (all prompts in one batched call).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _ours() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "megaflow" or k.startswith("megaflow.")}


@contextlib.contextmanager
def swapped(modules: dict):
    """sys.modules holds `modules` as the megaflow package inside the block."""
    saved = _ours()
    for k in saved:
        del sys.modules[k]
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k in _ours():
            del sys.modules[k]
        sys.modules.update(saved)


def import_baseline(commit: str, into: str) -> dict:
    """`megaflow` of `commit` imported from a git archive under `into`: its modules, by name."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "megaflow"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    with swapped({}):
        sys.path.insert(0, into)
        try:
            for name in ("megaflow.model.generate", "megaflow.model.starflow", "megaflow.model.config"):
                importlib.import_module(name)
            return _ours()
        finally:
            sys.path.remove(into)


def before_samples(sample_images, model, prompts) -> torch.Tensor:
    """The report's sampling before (megaflow/quality.py judge): one call of 20 images per prompt."""
    return torch.cat([sample_images(model, [p] * 20, guidance=6.0, temperature=0.8, seed=1000 + c)[0]
                      for c, p in enumerate(prompts)])


def after_samples(sample_prompts, model, prompts) -> torch.Tensor:
    """Today's: every prompt in one batched call, each prompt's noise from its own seed as before."""
    imgs = sample_prompts(model, prompts, 20, 6.0, 0.8, [1000 + c for c in range(len(prompts))])
    return imgs.flatten(0, 1)


def timed(fn, *args) -> tuple:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="874d2f8", help="commit of the code before issue 14")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from megaflow.model.starflow import build_model
    from megaflow.quality import sample_prompts
    from tools.bench_sampling import model_config, randomize
    with tempfile.TemporaryDirectory() as tmp:
        old = import_baseline(args.baseline, tmp)
        with swapped(old):
            old_model = randomize(old["megaflow.model.starflow"].build_model(model_config("report", 16)))
        new_model = build_model(model_config("report", 16)).eval().requires_grad_(False)
        new_model.load_state_dict(old_model.state_dict())  # older parameter names load (fused on load)
        tok = new_model.cfg.tokens
        prompts = [[tok.bos_id] + [(7 * i + k) % 500 for k in range(6)] for i in range(10)]
        ways = {"before": (old, partial(before_samples, old["megaflow.model.generate"].sample_images), old_model),
                "after": (_ours(), partial(after_samples, sample_prompts), new_model)}
        for modules, fn, model in ways.values():  # untimed: first-call set-up of each version
            with swapped(modules):
                fn(model, prompts[:1])
        times = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            images = {}
            for way in order:
                modules, fn, model = ways[way]
                with swapped(modules):
                    seconds, images[way] = timed(fn, model, prompts)
                times[way].append(seconds)
            diff = float((images["before"] - images["after"]).abs().max())
            print(json.dumps({"round": r, "before_s": times["before"][-1], "after_s": times["after"][-1],
                              "ratio": times["before"][-1] / times["after"][-1], "max_image_diff": diff}), flush=True)
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    print(json.dumps({"baseline": args.baseline, "threads": args.threads, "rounds": args.rounds,
                      "median_before_s": statistics.median(times["before"]),
                      "median_after_s": statistics.median(times["after"]),
                      "median_ratio_before_over_after": statistics.median(ratios)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
