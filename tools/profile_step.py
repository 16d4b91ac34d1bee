"""Throughput of one config's training step in one process: step time, tokens/s, images/s, model
TFLOP/s, MFU, peak memory, and optionally a torch.profiler trace.

    python tools/profile_step.py --config configs/h200_1b.yaml --steps 20           # on the GPU
    python tools/profile_step.py --config configs/tiny.yaml --device cpu --trace /tmp/prof
    megaflow profile --config configs/X.yaml --set data.batch_size=8 --json out.json

The model is built as `megaflow train` builds it (meta -> materialise -> init_weights -> curriculum
stage) and trained by its PlainEngine (forward, backward, clipping, AdamW; bf16 autocast as
train.dtype says), for --warmup untimed steps, then --steps timed ones. The batch has the config's
shapes: data.batch_size rows of data.seq_len tokens, every position a real token of one document
per row (no padding), with --images-per-row images of fae.n_tokens latent slots each (default:
about half of the row, at most data.max_images); `--real-data` reads batches from data.local with
the run's tokenizer instead. tokens/s counts non-padding positions (megaflow.monitor's rule; all of
them in the synthetic batch). MFU = model FLOP/s (megaflow.monitor.step_flops: 6 x matmul
multiply-adds per token + attention) / the device's peak dense bf16 FLOP/s (monitor.peak_flops,
or --peak-tflops); on a CPU or an unknown GPU it is reported as null unless --peak-tflops is given.
Peak memory: CUDA's max allocated over the timed steps; on CPU the process's peak resident set.

`--trace DIR` profiles --trace-steps more steps with torch.profiler and writes DIR/trace.json
(chrome://tracing or ui.perfetto.dev) and DIR/top_ops.txt, the 15 ops with the most self time.
What it does not do: time data loading (the batch is on the device before the clock starts) or
measure more than one process (tools/bench_tp.py, bench_pp.py, bench_zero.py do TP / PP / ZeRO).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.config import ConfigError, load_config  # noqa: E402
from megaflow.model.config import ModelConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def synthetic_batch(mcfg: ModelConfig, rows: int, seq_len: int, images_per_row: int, seed: int = 0) -> dict:
    """Rows of one document each: [bos text boi img*N eoi text ... eos], no padding, `images_per_row`
    images spread evenly; targets are the next token except where it is an image slot (the batch
    contract of docs/DATA.md)."""
    t, N = mcfg.tokens, mcfg.fae.n_tokens
    C, H = mcfg.fae.channels, mcfg.fae.image_size
    K, T = images_per_row, seq_len
    n_text = T - 2 - K * (N + 2)
    if n_text < 0:
        raise ValueError(f"{K} images of {N} latent tokens (+2 markers each) do not fit in seq_len={T}; "
                         f"lower --images-per-row")
    g = torch.Generator().manual_seed(seed)
    special = {t.pad_id, t.bos_id, t.eos_id, t.boi_id, t.eoi_id, t.image_id}
    words = torch.tensor([i for i in range(mcfg.vocab_size) if i not in special])
    row, img = [t.bos_id], [False]
    for k in range(K + 1):
        n = n_text // (K + 1) + (k < n_text % (K + 1))
        row += words[torch.randint(0, len(words), (n,), generator=g)].tolist()
        img += [False] * n
        if k < K:
            row += [t.boi_id] + [t.image_id] * N + [t.eoi_id]
            img += [False] + [True] * N + [False]
    row.append(t.eos_id)
    img.append(False)
    tokens = torch.tensor(row).expand(rows, T).clone()
    image_mask = torch.tensor(img).expand(rows, T).clone()
    targets = torch.where(image_mask.roll(-1, 1), -100, tokens.roll(-1, 1))
    targets[:, -1] = -100
    M = max(K, 1)
    images = torch.rand(rows, M, C, H, H, generator=g) * 2 - 1
    valid = torch.zeros(rows, M, dtype=torch.bool)
    valid[:, :K] = True
    return dict(tokens=tokens, targets=targets, position_ids=torch.arange(T).expand(rows, T).clone(),
                doc_ids=torch.zeros(rows, T, dtype=torch.long), image_mask=image_mask, images=images,
                image_valid=valid)


def build(cfg, device, real_data: bool):
    """(model, batch source) as `megaflow train` builds them; the batch source yields device batches."""
    from megaflow.model.starflow import build_model
    from megaflow.train import to_device
    if not real_data:
        model = build_model(cfg.model, device, seed=cfg.train.seed)
        return te_layers(model, cfg), None
    from data_pipeline.loader import build_loader
    from megaflow.train import _forever, load_run_tokenizer, prepare_data, with_tokenizer
    prepare_data(cfg)
    tok = load_run_tokenizer(cfg)
    model = build_model(with_tokenizer(cfg.model, tok), device, seed=cfg.train.seed)
    batches = _forever(build_loader(cfg.data, tok, 0, 1))
    return te_layers(model, cfg), (to_device(b, device) for b in batches)


def te_layers(model, cfg):
    """parallel.backend=te: the blocks' linears become Transformer Engine's, as `megaflow train` does."""
    if cfg.parallel.backend == "te":
        from parallel.backend import apply_te_dense
        apply_te_dense(model)
    return model


def default_images(mcfg: ModelConfig, seq_len: int, max_images: int) -> int:
    return max(0, min(max_images, (seq_len // 2) // (mcfg.fae.n_tokens + 2)))


def peak_memory_gib(device: torch.device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # KiB on Linux


def profile(args) -> dict:
    from megaflow.monitor import peak_flops, step_flops
    from megaflow.train import PlainEngine, pick_device, pick_dtype
    cfg = load_config(args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(args.device or cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    model, source = build(cfg, device, args.real_data)
    mcfg = model.cfg
    if source is None:
        K = default_images(mcfg, cfg.data.seq_len, cfg.data.max_images) if args.images_per_row < 0 \
            else args.images_per_row
        if K > cfg.data.max_images:
            raise ValueError(f"--images-per-row {K} is more than data.max_images={cfg.data.max_images}, the most a "
                             f"row of this config holds; lower it or --set data.max_images={K}")
        fixed = {k: v.to(device) for k, v in synthetic_batch(mcfg, cfg.data.batch_size, cfg.data.seq_len, K).items()}
        source = iter(lambda: fixed, None)
    engine = PlainEngine(model, cfg, dtype)
    g = torch.Generator().manual_seed(1)

    def step() -> tuple:
        batch = next(source)
        B, M = batch["image_valid"].shape
        noise = torch.randn(B, M, mcfg.fae.n_tokens, mcfg.fae.latent_dim, generator=g).to(device)
        keep = torch.ones(B, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = engine.train_step(batch, noise, keep, cfg.train.lr)  # reads the loss back: synchronises
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, batch, out

    losses = [step()[2]["loss"] for _ in range(args.warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, images, flops = [], [], [], []
    for _ in range(args.steps):
        dt, batch, out = step()
        losses.append(out["loss"])
        times.append(dt)
        tokens.append(int((batch["doc_ids"] >= 0).sum()))  # non-pad positions, as megaflow.monitor counts
        images.append(int(batch["image_valid"].sum()))
        flops.append(step_flops(model, batch))
    med = statistics.median(times)
    per_step = {"tokens": statistics.median(tokens), "images": statistics.median(images),
                "flops": statistics.median(flops)}
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    achieved = per_step["flops"] / med
    mem, mem_kind = peak_memory_gib(device)
    result = {
        "config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype or torch.float32).removeprefix("torch."), "rows": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len, "images_per_step": per_step["images"], "warmup": args.warmup,
        "steps": args.steps, "step_time_s": med, "step_time_min_s": min(times), "step_time_max_s": max(times),
        "tokens_per_s": per_step["tokens"] / med, "images_per_s": per_step["images"] / med,
        "model_tflop_per_step": per_step["flops"] / 1e12, "model_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": achieved / peak if peak else None,
        "peak_memory_gib": mem, "peak_memory_kind": mem_kind, "last_loss": out["loss"],
        "backend": cfg.parallel.backend, "fp8": cfg.parallel.fp8, "losses": losses,
    }
    if args.trace:
        result.update(trace(args.trace, step, args.trace_steps, device))
    return result


def trace(directory: str, step, n_steps: int, device: torch.device) -> dict:
    """torch.profiler over `n_steps` steps: chrome trace + the top-15 ops by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for _ in range(n_steps):
            step()
    prof.export_chrome_trace(str(d / "trace.json"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    (d / "top_ops.txt").write_text(table + "\n")
    return {"trace": str(d / "trace.json"), "top_ops": str(d / "top_ops.txt"), "top_ops_table": table}


def render(r: dict) -> str:
    fp8 = f", FP8 {r['fp8']}" if r.get("fp8", "off") != "off" else ""
    lines = [f"profile: {r['config']} on {r['device']} ({r['dtype']}, {r.get('backend', 'local')} layers{fp8}), "
             f"{r['rows']} x {r['seq_len']} tokens, "
             f"{r['images_per_step']} images per step; {r['warmup']} warm-up + {r['steps']} timed steps",
             f"  step time      {r['step_time_s'] * 1e3:10.2f} ms (median; min {r['step_time_min_s'] * 1e3:.2f}, "
             f"max {r['step_time_max_s'] * 1e3:.2f})",
             f"  tokens/s       {r['tokens_per_s']:10,.0f}",
             f"  images/s       {r['images_per_s']:10,.1f}",
             f"  model TFLOP/s  {r['model_tflops']:10.4f} ({r['model_tflop_per_step']:.4g} TFLOP per step)",
             f"  MFU            {100 * r['mfu']:10.2f} % of {r['peak_tflops']:.0f} TFLOP/s" if r["mfu"] is not None else
             f"  MFU                   n/a (no known peak for {r['device']}; pass --peak-tflops)",
             f"  peak memory    {r['peak_memory_gib']:10.3f} GiB ({r['peak_memory_kind']})"]
    if "trace" in r:
        lines += [f"  trace          {r['trace']}", r["top_ops_table"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megaflow profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"), help="run config (YAML)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    ap.add_argument("--device", default="", help="cpu | cuda | auto (default: train.device)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--images-per-row", type=int, default=-1, help="images in each synthetic row (-1: half the row)")
    ap.add_argument("--real-data", action="store_true", help="batches from data.local instead of synthetic ones")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (default: known GPUs)")
    ap.add_argument("--trace", default="", metavar="DIR", help="write a torch.profiler trace and op table here")
    ap.add_argument("--trace-steps", type=int, default=2, help="steps recorded by --trace")
    ap.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    try:
        result = profile(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"megaflow profile: error: {e}", file=sys.stderr)
        return 2
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if k != "top_ops_table"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
