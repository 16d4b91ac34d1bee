"""Sampling speed (issue 14): the earlier path (per-token torch.cat cache, every step launched from
Python) against the static KV cache, its one-token steps replayed as CUDA graphs (layers compiled
or not), and Jacobi iteration, on models with synthetic random weights (speed only: what is
sampled is noise). Ways: see `way_options`.

    python tools/bench_sampling.py --suite tarflow   [--out FILE] [--warmup]          # GPU
    python tools/bench_sampling.py --suite tarflow16 [--baseline-root DIR]            # GPU
    python tools/bench_sampling.py --suite h200_1b   [--baseline-root DIR]            # GPU
    python tools/bench_sampling.py --suite report    [--baseline-root DIR] [--threads 1]  # CPU

tarflow: TarFlow-only at apple/ml-tarflow's ImageNet-64 shape (64x64x3 in 2x2 patches = 1,024
tokens of 12 dims; 8 deep + 7 shallow blocks x 8 layers of width 768, 12 heads; bf16 weights;
no denoise step), 8 and 32 images, with and without guidance. tarflow16: the same model on 16x16
images (64 tokens), where the earlier path is also timed (at 64x64 it takes ~95 s per row).
h200_1b: configs/h200_1b.yaml's model (0.9B, bf16): text decoding (8 rows, 128 tokens, a host
sync per token as in sampling) and images (8 at once, 64 tokens each), as tokens/s.
report: the default run's model size (configs/default.yaml) on CPU: the report's 200 samples
(10 prompts x 20 images, guidance 6, temperature 0.8, with the denoise step).

`--baseline-root` is a checkout of the code before issue 14 (e.g. `git archive 874d2f8`): its
rows ("before") run in a subprocess importing megaflow from there; without it they are skipped.
Rows print as they finish, one JSON object per line (also appended to --out). This file does not
import data_pipeline (no mosaicml-streaming needed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

TOKENS = dict(pad_id=1000, bos_id=1001, eos_id=1002, boi_id=1003, eoi_id=1004, image_id=1005)


def model_config(suite: str, image_size: int = 64, smoke: bool = False):
    """The suite's model; `smoke` shrinks every width to 32 (a quick check of this script on CPU)."""
    from megaflow.model.config import FlowConfig, ModelConfig, SpecialTokens, VLMConfig
    from megaflow.model.fae import FAEConfig
    if smoke:
        w = dict(dim=32, n_heads=4, ffn_dim=64)
        vlm = None if suite == "tarflow" else VLMConfig(vocab_size=512, n_layers=2, n_kv_heads=2, **w)
        flow = FlowConfig(n_layers=2, ratio=0 if vlm is None else 1, n_shallow=2, shallow_layers=1, shallow_dim=16,
                          shallow_heads=2, n_cond_tokens=1006 if vlm is None else 0, **w)
        tokens = TOKENS if vlm is None else {k: v - 500 for k, v in TOKENS.items()}
        return ModelConfig(vlm=vlm, flow=flow, fae=FAEConfig(mode="pixels", image_size=image_size // 4, channels=1,
                                                             patch_size=2), tokens=SpecialTokens(**tokens))
    if suite == "tarflow":
        flow = FlowConfig(dim=768, n_heads=12, ffn_dim=3072, n_layers=8, ratio=0, n_shallow=7, shallow_layers=8,
                          shallow_dim=768, shallow_heads=12, n_cond_tokens=1006)
        return ModelConfig(vlm=None, flow=flow, fae=FAEConfig(mode="pixels", image_size=image_size, channels=3,
                                                              patch_size=2), tokens=SpecialTokens(**TOKENS))
    special = SpecialTokens(**{k: v - 500 for k, v in TOKENS.items()})  # ids 500..505 of a 512 vocabulary
    if suite == "h200_1b":
        vlm = VLMConfig(vocab_size=512, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=5632)
        flow = FlowConfig(dim=1024, n_heads=8, ffn_dim=2816, n_layers=8, ratio=2, n_shallow=2, shallow_layers=2,
                          shallow_dim=256, shallow_heads=4)
        fae = FAEConfig(mode="pixels", image_size=32, channels=1, patch_size=4)
    else:  # report: configs/default.yaml
        vlm = VLMConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384)
        flow = FlowConfig(dim=128, n_heads=4, ffn_dim=384, n_layers=4, ratio=1, n_shallow=2, shallow_layers=2,
                          shallow_dim=64, shallow_heads=2)
        fae = FAEConfig(mode="pixels", image_size=16, channels=1, patch_size=4)
    return ModelConfig(vlm=vlm, flow=flow, fae=fae, tokens=special)


_MODELS = {}
SMOKE = False
BF16 = False  # bf16 weights on the CPU too (--bf16: the GPU's dtypes, checked on the CPU)


def build(suite: str, image_size: int, device: str):
    """The suite's model with random weights (zero-initialised heads and skips drawn too, so that
    no step is the identity), bf16 on CUDA. Deterministic: the same in both code versions."""
    key = (suite, image_size)
    if key not in _MODELS:
        from megaflow.model.starflow import build_model
        _MODELS.clear()
        model = randomize(build_model(model_config(suite, image_size, SMOKE), device=device, seed=0))
        _MODELS[key] = model.to(torch.bfloat16) if device == "cuda" or BF16 else model
    return _MODELS[key]


@torch.no_grad()
def randomize(model):
    """Zero-initialised parameters (heads, skips, biases) drawn with std 0.02, so no step is the
    identity; the model in eval mode without gradients."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if torch.count_nonzero(p) == 0:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


WAYS = ("before", "eager", "graphs", "compiled", "jacobi")


def way_options(way: str) -> tuple:
    """(sampling keywords, compile_steps backend) of a way: before = the old code's defaults; eager =
    static cache, no graphs; graphs = graphed steps, layers not compiled (issue 14's first version);
    compiled = graphed steps with compiled layers (the default now); jacobi = the default + Jacobi."""
    return {"before": ({}, None), "eager": (dict(graphs=False), "off"), "graphs": (dict(graphs=None), "off"),
            "compiled": (dict(graphs=None), "auto"), "jacobi": (dict(graphs=None, method="jacobi"), "auto")}[way]


def run_row(row: dict, device: str) -> dict:
    """Time one row: {suite, task, way, images|rows, guidance, image_size} (way: WAYS). Jacobi's
    options: row keys tol (default 1e-4) and chunk (default 64). A row with runs=2 runs twice:
    seconds is the second run, first_seconds the first (with compilation for shapes new to the
    process; later rows of other sizes reuse the dynamic-shape graphs compiled by then)."""
    new, backend = way_options(row["way"])
    if backend is None:
        return _run_row(row, device, new)
    from megaflow.model.decoding import compile_steps
    with compile_steps(backend):
        if row.get("runs", 1) == 1:
            return _run_row(row, device, new)
        first = _run_row(row, device, new)  # compiles the layers for shapes not seen yet in this process
        return {**_run_row(row, device, new), "first_seconds": first["seconds"]}


def _run_row(row: dict, device: str, new: dict) -> dict:
    from megaflow.model.generate import Decoder, sample_images
    suite, way = row["suite"], row["way"]
    model = build(suite, row.get("image_size", 64), device)
    tok, N = model.cfg.tokens, model.cfg.fae.n_tokens
    if way == "jacobi":
        new = dict(new, tol=row.get("tol", 1e-4), chunk=row.get("chunk", 64))
    sync(device)
    t = time.perf_counter()
    if row["task"] == "images":
        n = row["images"]
        prompts = [[tok.bos_id] + [(7 * i + k) % 500 for k in range(row.get("prompt_len", 1))] for i in range(n)]
        kw = dict(temperature=row.get("temperature", 1.0), do_denoise=row.get("denoise", False))
        for rep in range(row.get("repeat", 1)):
            imgs, dec = sample_images(model, prompts, guidance=row["guidance"], seed=rep, **kw, **new)
        sync(device)
        dt = time.perf_counter() - t
        out = {"seconds": dt, "image_tokens_per_s": row.get("repeat", 1) * n * N / dt,
               "checksum": float(imgs.float().abs().mean())}
        if getattr(dec, "stats", None):
            out["iterations"] = dec.stats
        return {**row, **out}
    R, steps = row["rows"], row["steps"]  # text decoding: greedy, one host sync per token
    dec = Decoder(model, R, **({} if way == "before" else {"graphs": new["graphs"], "capacity": 8 + steps}))
    dec.feed(torch.tensor([[tok.bos_id, 5, 6, 7, 8, 9, 10, 11]] * R, device=device))
    logits = dec.next_logits()
    for _ in range(steps):
        nxt = logits.argmax(-1)[:, None]
        int(nxt[0])  # the sampler reads each token on the host
        if way == "before":
            dec.feed(nxt)
            logits = dec.next_logits()
        else:
            logits = dec.text_step(nxt)
    sync(device)
    dt = time.perf_counter() - t
    return {**row, "seconds": dt, "text_tokens_per_s": R * steps / dt}


def check_graphs(device: str) -> dict:
    """fp32, small widths: graphed steps with compiled layers give what eager steps give (images,
    text tokens), and so does Jacobi run to exactness (tol < 0) in graphed windows."""
    from megaflow.model.generate import sample_images, sample_text
    global SMOKE
    smoke, SMOKE = SMOKE, True
    try:
        model = build("h200_1b", 64, device).float()
        tok = model.cfg.tokens
        prompts = [[tok.bos_id, 5, 6, 7], [tok.bos_id, 9]]
        a, _ = sample_images(model, prompts, guidance=2.0, seed=1, graphs=True, do_denoise=False)
        b, _ = sample_images(model, prompts, guidance=2.0, seed=1, graphs=False, do_denoise=False)
        j, dj = sample_images(model, prompts, guidance=2.0, seed=1, graphs=True, do_denoise=False,
                              method="jacobi", tol=-1.0, chunk=4)
        ta = sample_text(model, prompts, max_new_tokens=12, temperature=1.0, seed=1, graphs=True)
        tb = sample_text(model, prompts, max_new_tokens=12, temperature=1.0, seed=1, graphs=False)
    finally:
        SMOKE = smoke
        _MODELS.clear()
    return {"check": "graphs+compiled vs eager, fp32", "image_max_diff": float((a - b).abs().max()),
            "jacobi_max_diff": float((j - b).abs().max()), "jacobi_iterations": dj.stats, "text_equal": ta == tb}


def rows_for(suite: str) -> list:
    """The suite's rows, the issue's headline first (a suite may be cut short by its time limit)."""
    rows = []
    img = lambda way, n, g, size=64, **kw: dict(suite=suite, task="images", way=way, images=n, guidance=g,  # noqa: E731
                                                image_size=size, **kw)
    if suite == "tarflow":
        for n in (8, 32):
            for g in (0.0, 2.0):
                rows += [img("graphs", n, g), img("compiled", n, g, runs=2 if n == 8 and g == 0 else 1)]
        rows += [img("jacobi", 8, 0.0, runs=2), img("jacobi", 8, 2.0), img("jacobi", 8, 0.0, chunk=16)]
    elif suite == "tarflow16":  # the same model on 16x16 images (64 tokens): the pre-issue code is timed too
        for g in (0.0, 2.0):
            rows += [img(w, 8, g, 16) for w in ("before", "eager", "graphs", "compiled", "jacobi")]
    elif suite == "h200_1b":
        for w in ("before", "graphs", "compiled"):
            rows.append(dict(suite=suite, task="text", way=w, rows=8, steps=128, image_size=32, runs=2))
        for w in ("before", "graphs", "compiled", "jacobi"):
            rows.append(img(w, 8, 0.0, 32, prompt_len=8, runs=2))
    else:
        rows = [dict(suite=suite, task="images", way=w, images=20, repeat=10, guidance=6.0, temperature=0.8,
                     denoise=True, image_size=16, prompt_len=6) for w in ("before", "eager", "jacobi")]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["tarflow", "tarflow16", "h200_1b", "report"], default="tarflow")
    ap.add_argument("--baseline-root", default=None, help="checkout of the code before issue 14 (rows 'before')")
    ap.add_argument("--out", default=None, help="append each row's JSON here too")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="run the rows this many times, in turn (noisy machines)")
    ap.add_argument("--ways", default=None, help=f"comma-separated subset of {','.join(WAYS)}")
    ap.add_argument("--select", default=None,
                    help="keep rows matching one of 'k=v,k=v;k=v,...' (e.g. images=8,guidance=0.0)")
    ap.add_argument("--warmup", action="store_true",
                    help="first an untimed small row (CUDA, cuBLAS and allocator start-up)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths: check this script quickly on CPU")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights on the CPU too (as on the GPU)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="on CUDA, after the rows: graphed+compiled sampling equals eager sampling (check_graphs)")
    ap.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # internal: run these rows here
    args = ap.parse_args(argv)
    global SMOKE, BF16
    SMOKE, BF16 = args.smoke, args.bf16
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = json.loads(args.rows_json) if args.rows_json else rows_for(args.suite)
    if args.ways:
        rows = [r for r in rows if r["way"] in args.ways.split(",")]
    if args.select:
        alts = [dict(kv.split("=") for kv in alt.split(",")) for alt in args.select.split(";")]
        rows = [r for r in rows if any(all(str(r.get(k)) == v for k, v in alt.items()) for alt in alts)]
    if args.rows_json is None:
        rows = [dict(r, round=k) for k in range(args.rounds) for r in rows]
    mine = [r for r in rows if r["way"] != "before" or args.rows_json]
    if args.warmup and mine:  # untimed, this process's first way (a subprocess warms up its own)
        size = 16 if mine[0]["suite"].startswith("tarflow") else mine[0].get("image_size", 64)
        run_row(dict(mine[0], images=2, image_size=size, repeat=1, steps=4), device)
    if args.rows_json is None:
        print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                          "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    i = 0
    while i < len(rows):
        if rows[i]["way"] == "before" and args.rows_json is None:
            j = i  # a run of 'before' rows goes to one subprocess importing the old code
            while j < len(rows) and rows[j]["way"] == "before":
                j += 1
            if args.baseline_root:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline_root))
                cmd = [sys.executable, os.path.abspath(__file__), "--rows-json", json.dumps(rows[i:j]),
                       "--threads", str(args.threads)] + (["--out", os.path.abspath(args.out)] if args.out else [])
                cmd += ["--smoke"] if args.smoke else []
                cmd += ["--bf16"] if args.bf16 else []
                cmd += ["--warmup"] if args.warmup else []
                subprocess.run(cmd, env=env, cwd=args.baseline_root, check=False)
            i = j
            continue
        try:
            res = run_row(rows[i], device)
        except Exception as e:  # one broken row must not lose the others' figures
            res = {**rows[i], "error": f"{type(e).__name__}: {e}"}
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
        i += 1
    if device == "cuda" and args.rows_json is None and args.check:  # last: a time limit cuts it, not the rows
        print(json.dumps(check_graphs(device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
