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

Every profile also times as many steps back to back with one wait at the end ("loop"), as the
training loop runs them (nothing waits for the GPU inside a step, so the host prepares the next step
while the GPU finishes this one); the synced median above waits before and after each step. On CUDA
both timings are also read from the GPU's side (tools/gpu_timing.py): each step's time between CUDA
events, the SM clock and power draw sampled through NVML, and the host's time per step call in the
loop, so a back-to-back figure slower than the synced one can be told apart: the GPU waiting for the
host, or the GPU itself running slower. Back to back it also reports the GPU's idle time between
steps (events), the host's time preparing each step's inputs, and the loop's time outside its steps'
GPU time (the first step's preparation, paid once a loop as after every host sync in training);
synced, the GPU's rest before each step: on a power-capped card (the H200 at 700 W) a longer rest buys
the next step a higher clock, so synced rows compare only at equal rests (docs/benchmarks.md, round 8).

`--trace DIR` profiles --trace-steps more steps with torch.profiler and writes DIR/trace.json
(chrome://tracing or ui.perfetto.dev) and DIR/top_ops.txt, the 30 ops with the most self time.
What it does not do: time data loading (the batch is on the device before the clock starts) or
measure more than one process (tools/bench_tp.py, bench_pp.py, bench_zero.py do TP / PP / ZeRO).
Under torchrun (WORLD_SIZE > 1) it runs tools/bench_scaling.py's `config` row instead: the config's
own parallel layout, and per rank compute, exposed communication, pipeline wait and idle time
(parallel/rank_profile.py); `--trace DIR` then writes one trace per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.config import ConfigError, load_config  # noqa: E402
from megaflow.model.config import ModelConfig  # noqa: E402
from tools.gpu_timing import ClockSampler, StepEvents  # noqa: E402

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
    from parallel.backend import apply_fp8_layers  # TE / FP8 linears, as `megaflow train` swaps them in
    if not real_data:
        model = build_model(cfg.model, device, seed=cfg.train.seed)
        return apply_fp8_layers(model, cfg.parallel), None
    from megaflow.train import _forever, with_tokenizer
    tok, loader = real_loader(cfg, pin_memory=device.type == "cuda")
    model = build_model(with_tokenizer(cfg.model, tok), device, seed=cfg.train.seed)
    return apply_fp8_layers(model, cfg.parallel), (to_device(b, device) for b in _forever(loader))


def real_loader(cfg, pin_memory: bool) -> tuple:
    """(tokenizer, loader) of the config's real data, prepared as `megaflow train` prepares it (one rank)."""
    from data_pipeline.loader import build_loader
    from megaflow.train import load_run_tokenizer, prepare_data
    prepare_data(cfg)
    tok = load_run_tokenizer(cfg)
    return tok, build_loader(cfg.data, tok, 0, 1, pin_memory=pin_memory)


def default_images(mcfg: ModelConfig, seq_len: int, max_images: int) -> int:
    return max(0, min(max_images, (seq_len // 2) // (mcfg.fae.n_tokens + 2)))


def peak_memory_gib(device: torch.device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # KiB on Linux


def profile(args) -> dict:
    """The profile of the config (+ overrides), or, with --variant, one row per variant (each its own
    overrides on top), all in this process; with --baseline the plain-PyTorch anchor too."""
    base = load_config(args.config, args.overrides)
    device = pick_device_for(args, base)
    variants = [parse_variant(v) for v in args.variant] or [("", [])]
    warn_mixed_compile_modes(args, variants)
    rows = []
    for name, sets in variants:
        try:  # --trace records the last variant only
            r = profile_one(args, args.overrides + sets, device, measure_parts=bool(args.parts) and args.parts in ("all", name),
                            trace_dir=args.trace if name == variants[-1][0] else "")
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            if not args.variant:
                raise
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            _free(device)
        r["variant"], r["sets"] = name, sets
        rows.append(r)
        if args.variant and args.json:  # the rows so far, so a run cut short (a time limit) keeps them
            Path(args.json).write_text(json.dumps({"config": args.config, "variants": rows}, indent=1, default=str))
        if args.variant:  # progress, so a run cut short still shows its rows
            print(f"[{name}] " + (r["error"] if "error" in r else
                  f"{r['step_time_s'] * 1e3:.1f} ms, {r['images_per_s']:.1f} img/s, MFU "
                  f"{100 * r['mfu'] if r['mfu'] is not None else float('nan'):.1f} %, {r['peak_memory_gib']:.1f} GiB"
                  f"{'' if r.get('peak_reserved_gib') is None else ' (reserved %.1f)' % r['peak_reserved_gib']}, "
                  f"warm-up {r['warmup_s']:.0f} s; back to back {r['loop_step_time_s'] * 1e3:.1f} ms, MFU "
                  f"{100 * r['loop_mfu'] if r['loop_mfu'] is not None else float('nan'):.1f} %"), flush=True)
    result = rows[0] if not args.variant else {"config": args.config, "variants": rows}
    if args.baseline:
        result["baseline"] = baseline_for(base, device, args)
        if args.real_data:  # the same Llama over the packed rows: what a user's own code gets on this data
            result["baseline_packed"] = baseline_for(base, device, args, packed=True)
    return result


def pick_device_for(args, cfg):
    from megaflow.train import pick_device
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return pick_device(args.device or cfg.train.device)


def parse_variant(text: str) -> tuple:
    """'NAME=key=value;key=value' -> (NAME, ['key=value', ...]); 'NAME=' is the config as it is."""
    name, _, rest = text.partition("=")
    if not name:
        raise ValueError(f"--variant {text!r} must be NAME=key=value;key=value (or NAME= for none)")
    return name, [s for s in rest.split(";") if s]


def warn_mixed_compile_modes(args, variants) -> list:
    """The compile modes of the variants (a variant whose overrides do not load is left to its own row's
    error); a note when they differ. On the H200 (docs/benchmarks.md, round 12) a `train.compile_mode=tuned`
    TarFlow variant after a default one in the same process ran 308 ms a step, against 245 ms run first in
    its own process: rows of different compile modes are compared across processes."""
    from megaflow.speed import TORCH_COMPILE_MODES
    modes = []
    for _, sets in variants:
        try:
            mode = load_config(args.config, args.overrides + sets).train.compile_mode
        except (ConfigError, ValueError):
            continue
        if mode in TORCH_COMPILE_MODES:  # a bad mode is its row's error
            modes.append(mode)
    if len(set(modes)) > 1:
        print(f"note: the variants differ in train.compile_mode ({', '.join(sorted(set(modes)))}); in one process a later "
              "mode's row can run slower than the same mode alone (seen on the H200: docs/benchmarks.md, round 12): "
              "compare compile modes with one process each", flush=True)
    return modes


def _free(device):
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def profile_one(args, overrides: list, device, measure_parts: bool = False, trace_dir: str = "") -> dict:
    from megaflow.monitor import peak_flops, step_flops
    from megaflow.train import PlainEngine, host_to_device, pick_dtype, read_metrics
    cfg = load_config(args.config, overrides)
    dtype = pick_dtype(cfg.train.dtype, device)
    _free(device)
    model, source = build(cfg, device, args.real_data)
    mcfg = model.cfg
    if source is None:
        K = default_images(mcfg, cfg.data.seq_len, cfg.data.max_images) if args.images_per_row < 0 \
            else args.images_per_row
        if K > cfg.data.max_images:
            raise ValueError(f"--images-per-row {K} is more than data.max_images={cfg.data.max_images}, the most a "
                             f"row of this config holds; lower it or --set data.max_images={K}")
        fixed = {k: v.to(device) for k, v in synthetic_batch(mcfg, cfg.data.batch_size, cfg.data.seq_len, K).items()}
        if not args.doc_mask:  # one document per row: its document mask is the causal mask
            fixed.pop("doc_ids")
        source = iter(lambda: fixed, None)
    t_build = time.perf_counter()
    engine = PlainEngine(model, cfg, dtype)
    g = torch.Generator().manual_seed(1)
    events = StepEvents(device)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def step(wait: bool = True) -> tuple:
        """(host s of the step call, batch, outputs, host s preparing its inputs: batch and noise)"""
        t_prep = time.perf_counter()
        batch = next(source)
        B, M = batch["image_valid"].shape
        noise = host_to_device(torch.randn(B, M, mcfg.fae.n_tokens, mcfg.fae.latent_dim, generator=g), device)
        keep = torch.ones(B, device=device)
        if wait:
            sync()
        t0 = time.perf_counter()
        events.start()
        out = engine.train_step(batch, noise, keep, cfg.train.lr)
        events.end()
        if wait:
            sync()
        return time.perf_counter() - t0, batch, out, t0 - t_prep

    losses = [float(step()[2]["loss"]) for _ in range(args.warmup)]
    warmup_s = time.perf_counter() - t_build
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    events.per_step_ms(False)  # the warm-up's dropped
    clocks = ClockSampler(device)
    t_synced = time.perf_counter()
    times, tokens, images, flops, rests, last_end = [], [], [], [], [], None
    for _ in range(args.steps):
        dt, batch, out, _ = step()
        end = time.perf_counter()
        if last_end is not None:  # the GPU idles from one synced step's end to the next one's start
            rests.append(end - dt - last_end)
        last_end = end
        losses.append(float(out["loss"]))
        times.append(dt)
        real = real_tokens(batch)
        tokens.append(real)
        images.append(int(batch["image_valid"].sum()))
        flops.append(step_flops(model, batch))  # real tokens only (step_flops skips padding itself)
    med = statistics.median(times)
    gpu_synced, t_loop = events.per_step_ms(False), time.perf_counter()
    loop_s, loop_flops, loop_host, loop_prep = loop_time(step, sync, args.steps, model)
    gpu_gaps = events.gaps_ms()
    gpu_loop, t_end = events.per_step_ms(True), time.perf_counter()
    clocks.stop()
    per_step = {"tokens": statistics.median(tokens), "images": statistics.median(images),
                "flops": statistics.median(flops)}
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    achieved = per_step["flops"] / med
    mem, mem_kind = peak_memory_gib(device)
    result = {
        "config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "param_dtype": str(engine.param_dtype).removeprefix("torch."), **engine.speedups,
        "activation_checkpointing": cfg.train.activation_checkpointing, "rows": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len, "params": sum(p.numel() for p in model.parameters()),
        "images_per_step": per_step["images"], "warmup": args.warmup, "warmup_s": warmup_s,
        "steps": args.steps, "step_time_s": med, "step_time_min_s": min(times), "step_time_max_s": max(times),
        "tokens_per_s": per_step["tokens"] / med, "images_per_s": per_step["images"] / med,
        "model_tflop_per_step": per_step["flops"] / 1e12, "model_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": achieved / peak if peak else None,
        "loop_step_time_s": loop_s, "loop_mfu": loop_flops / loop_s / peak if peak else None,
        "loop_host_ms": 1e3 * statistics.median(loop_host),  # the host's time in one step call, back to back
        # the GPU's rest before each synced step (this loop's reads + the next step's preparation): on a power-capped
        # card a longer rest gives the next step a higher clock, so synced rows with different rests do not compare
        "synced_rest_ms": 1e3 * statistics.median(rests) if rests else None,
        "loop_prep_ms": 1e3 * statistics.median(loop_prep),  # and in preparing its batch and noise before the call
        # back to back, GPU ms between a step's end and the next one's start (the GPU waiting for the host), and
        # the loop's ms a step not covered by its steps' GPU time: the first step's preparation, paid once a loop
        "loop_gpu_gap_ms": statistics.median(gpu_gaps) if gpu_gaps else None,
        "loop_lead_ms": (1e3 * loop_s * args.steps - sum(gpu_loop)) / args.steps if gpu_loop else None,
        "gpu_step_ms": statistics.median(gpu_synced) if gpu_synced else None,  # CUDA events, synced steps
        "loop_gpu_step_ms": statistics.median(gpu_loop) if gpu_loop else None,  # and back to back
        "clocks": {"synced": clocks.summary(t_synced, t_loop), "loop": clocks.summary(t_loop, t_end)}
        if device.type == "cuda" else None,
        "peak_memory_gib": mem, "peak_memory_kind": mem_kind, "last_loss": losses[-1],
        # a CUDA graph's activations are in the private pool made at capture: allocated before the timed steps
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "last_metrics": read_metrics(out), "backend": cfg.parallel.backend, "fp8": cfg.parallel.fp8, "losses": losses,
    }
    if measure_parts:
        from tools.profile_parts import measure_parts as parts
        result["parts"] = parts(model, batch, dtype, device, peak, med)
    if trace_dir:
        result.update(trace(trace_dir, step, args.trace_steps, device, args.trace_loop))
    del engine, model, source
    _free(device)
    return result


def loop_time(step, sync, n: int, model) -> tuple:
    """Seconds per step and FLOPs per step of `n` steps run back to back, as the training loop runs
    them (nothing waits for the GPU inside a step, so the host prepares the next step while the GPU
    finishes this one), with one wait at the end; the host's seconds in each step call and in preparing
    each step's inputs before it."""
    from megaflow.monitor import step_flops
    sync()
    t0 = time.perf_counter()
    host, batches, _, prep = zip(*[step(wait=False) for _ in range(n)])
    sync()
    dt = (time.perf_counter() - t0) / n
    return dt, sum(step_flops(model, b) for b in batches) / n, host, prep


def real_tokens(batch: dict) -> int:
    """Non-padding positions (megaflow.monitor's rule); without doc_ids every position is real."""
    return int((batch["doc_ids"] >= 0).sum()) if "doc_ids" in batch else batch["tokens"].numel()


def packed_layouts(cfg, n: int) -> list:
    """The (rows, seq_len) doc ids of the first n batches the data pipeline packs for this config (CPU)."""
    from megaflow.train import _forever
    with real_loader(cfg, pin_memory=False)[1] as loader:
        batches = _forever(loader)
        return [next(batches)["doc_ids"].clone() for _ in range(n)]


def baseline_for(cfg, device, args, packed: bool = False) -> dict:
    """The plain-PyTorch Llama of the VLM stream's width and depth (the flow stream's for a
    TarFlow-only model) on the config's rows x seq_len tokens (tools/baseline_llama.py); `packed`: over the
    layouts of the config's real packed batches (document masks, per-document positions and FLOPs)."""
    from megaflow.monitor import peak_flops
    from tools.baseline_llama import run_baseline
    m = cfg.model
    if m.vlm is not None:
        v = m.vlm
        shape = dict(vocab=v.vocab_size, dim=v.dim, n_layers=v.n_layers, n_heads=v.n_heads, n_kv_heads=v.n_kv_heads,
                     ffn_dim=v.ffn_dim)
    else:
        f = m.flow
        shape = dict(vocab=max(m.vocab_size, 256), dim=f.dim, n_layers=f.n_layers + f.n_shallow * f.shallow_layers,
                     n_heads=f.n_heads, n_kv_heads=f.n_heads, ffn_dim=f.ffn_dim)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    _free(device)
    try:
        layouts = packed_layouts(cfg, args.warmup + args.steps) if packed else None
        return run_baseline(**shape, rows=cfg.data.batch_size, seq_len=cfg.data.seq_len, device=device,
                            steps=args.steps, warmup=args.warmup, compile=device.type == "cuda", peak_flops=peak,
                            doc_ids=layouts)
    except Exception as e:  # noqa: BLE001 - the profile itself still reports
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", **shape}


def trace(directory: str, step, n_steps: int, device: torch.device, back_to_back: bool = False) -> dict:
    """torch.profiler over `n_steps` steps: chrome trace, the top-30 ops by self time, the top host
    ops by self CPU time (where the host waits: a synchronising CUDA call shows here), and the GPU
    time by kernel category (GEMM, attention, compiled/Triton fusions, copies/casts, ...).
    `back_to_back`: the steps run as the training loop runs them, one wait at the end."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step(wait=not back_to_back)
        if back_to_back and device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    prof.export_chrome_trace(str(d / "trace.json"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (d / "top_ops.txt").write_text(table + "\n")
    host_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    (d / "top_host_ops.txt").write_text(host_table + "\n")
    out = {"trace": str(d / "trace.json"), "top_ops": str(d / "top_ops.txt"), "top_ops_table": table,
           "top_host_ops_table": host_table, "trace_back_to_back": back_to_back}
    if device.type == "cuda":
        out["kernel_categories"] = kernel_categories(prof)
        busy, idle, gaps = kernel_timeline(prof)
        out["gpu_busy_pct"] = round(100 * busy / wall_us, 1)
        out["gpu_idle_ms_per_step"] = round(idle / 1e3 / n_steps, 2)  # between kernels, the steps' syncs included
        out["longest_gpu_gaps"] = gaps
        out["top_kernels"] = top_kernels(prof, n_steps)
        (d / "top_kernels.txt").write_text("\n".join(f"{ms:9.3f} ms/step {n:6d} x  {cat:26s} {name}"
                                                     for name, ms, n, cat in out["top_kernels"]) + "\n")
    return out


def top_kernels(prof, n_steps: int, top: int = 40) -> list:
    """[(kernel name, GPU ms per step, launches per step, category)] of the `top` kernels by time."""
    per = {}
    for evt in prof.events():
        if _is_kernel(evt):
            t, n = per.get(evt.name, (0.0, 0))
            per[evt.name] = (t + (evt.device_time if hasattr(evt, "device_time") else evt.cuda_time), n + 1)
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return [(name, round(t / n_steps / 1e3, 3), n // n_steps, kernel_category(name)) for name, (t, n) in rows]


def kernel_timeline(prof, top: int = 8) -> tuple:
    """(busy us: in which at least one GPU kernel ran, the union of the kernels' intervals; idle us
    between the first and the last kernel; the `top` longest idle gaps as
    (us, the kernel before, the kernel after)): where the GPU waits for the host."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if _is_kernel(e) and e.time_range.end > e.time_range.start)
    busy, idle, end, before, gaps = 0.0, 0.0, float("-inf"), "", []
    for a, b, name in spans:
        if a > end and before:
            idle += a - end
            gaps.append((round(a - end, 1), before[:60], name[:60]))
        if b > end:
            busy += b - max(a, end)
            end, before = b, name
    return busy, idle, sorted(gaps, reverse=True)[:top]


CATEGORIES = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
              ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "splitk", "triton_tem")),
              ("optimizer (flat AdamW)", ("adamw_kernel",)),
              ("compiled fusions (triton)", ("triton",)),  # before copy/cast: inductor names hold "_to_copy"
              ("copy/cast", ("copy", "memcpy", "memset", "cast", "convert", "fill")),
              ("optimizer", ("adam", "foreach", "multi_tensor")),
              ("elementwise", ("elementwise", "vectorized", "unrolled")),
              ("reductions/norms", ("reduce", "norm", "softmax", "cross_entropy", "nll")))


def _is_kernel(evt) -> bool:
    """A GPU kernel or copy: not a GPU-side annotation range (it would count its kernels twice), not
    the driver's "Command Buffer Full" marker (the host waiting on a full launch queue)."""
    return getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA and \
        not getattr(evt, "is_user_annotation", False) and \
        not evt.name.startswith(("Optimizer.", "ProfilerStep", "Command Buffer Full"))


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def kernel_categories(prof) -> dict:
    """{category: percent of the GPU kernel time} from the profiler's device events."""
    totals, all_time = {}, 0.0
    for evt in prof.events():
        if not _is_kernel(evt):
            continue
        t = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
        cat = kernel_category(evt.name)
        totals[cat] = totals.get(cat, 0.0) + t
        all_time += t
    return {c: round(100 * t / all_time, 1) for c, t in sorted(totals.items(), key=lambda kv: -kv[1])} if all_time else {}


def render(r: dict) -> str:
    if "variants" in r:
        return render_variants(r)
    fp8 = f", FP8 {r['fp8']}" if r.get("fp8", "off") != "off" else ""
    base = r.get("baseline", {})
    anchor = f" (plain-PyTorch baseline: {100 * base['mfu']:.2f} %)" if base.get("mfu") is not None else ""
    lines = [f"profile: {r['config']} on {r['device']} ({r['dtype']} compute, {r['param_dtype']} weights, "
             f"{r['compiled_regions']} compiled regions, activation checkpointing {r['activation_checkpointing']}, "
             f"{r.get('backend', 'local')} layers{fp8}), "
             f"{r['rows']} x {r['seq_len']} tokens, "
             f"{r['images_per_step']} images per step; {r['warmup']} warm-up + {r['steps']} timed steps",
             f"  step time      {r['step_time_s'] * 1e3:10.2f} ms (median; min {r['step_time_min_s'] * 1e3:.2f}, "
             f"max {r['step_time_max_s'] * 1e3:.2f}); back to back {r['loop_step_time_s'] * 1e3:.2f} ms",
             f"  tokens/s       {r['tokens_per_s']:10,.0f}",
             f"  images/s       {r['images_per_s']:10,.1f}",
             f"  model TFLOP/s  {r['model_tflops']:10.4f} ({r['model_tflop_per_step']:.4g} TFLOP per step)",
             f"  MFU            {100 * r['mfu']:10.2f} % of {r['peak_tflops']:.0f} TFLOP/s{anchor}; back to back "
             f"{100 * r['loop_mfu']:.2f} %" if r["mfu"] is not None else
             f"  MFU                   n/a (no known peak for {r['device']}; pass --peak-tflops)",
             f"  peak memory    {r['peak_memory_gib']:10.3f} GiB ({r['peak_memory_kind']})"]
    lines += render_extras(r)
    lines += [render_baseline(b) for b in (base, r.get("baseline_packed")) if b]
    return "\n".join(lines)


def render_extras(r: dict) -> list:
    lines = []
    if r.get("gpu_step_ms") is not None:
        c = r.get("clocks") or {}
        clock = " ".join(f"{k}: {v['sm_mhz']} MHz, {v['power_w']} W{', limits ' + str(v['limits']) if v['limits'] else ''};"
                         for k, v in c.items() if v.get("samples")) or f"no clock samples ({c.get('synced', {}).get('error')})"
        rest = f" (rest before each: {r['synced_rest_ms']:.1f} ms)" if r.get("synced_rest_ms") is not None else ""
        lines.append(f"  GPU ms a step (CUDA events): synced {r['gpu_step_ms']:.1f}{rest}, back to back {r['loop_gpu_step_ms']:.1f}; "
                     f"host ms a step call back to back {r['loop_host_ms']:.1f}; {clock}")
        if r.get("loop_gpu_gap_ms") is not None:
            lines.append(f"  back to back: GPU idle between steps {r['loop_gpu_gap_ms']:.2f} ms (median); host ms "
                         f"preparing a step's inputs {r['loop_prep_ms']:.1f}; loop ms a step outside the steps' GPU "
                         f"time {r['loop_lead_ms']:.1f} (the first step's preparation, once a loop)")
    if "parts" in r:
        from tools.profile_parts import render_parts
        lines.append(render_parts(r["parts"]))
    if "kernel_categories" in r:
        lines.append("  GPU kernel time by category: " + ", ".join(f"{k} {v}%" for k, v in r["kernel_categories"].items()))
        lines.append(f"  GPU busy (some kernel running) {r['gpu_busy_pct']}% of the traced steps' wall time (profiler on); "
                     f"idle between kernels {r['gpu_idle_ms_per_step']} ms a step; longest gaps (us, kernel before -> after):")
        lines += [f"    {us:9.1f}  {a} -> {b}" for us, a, b in r["longest_gpu_gaps"]]
    if r.get("top_kernels"):
        lines.append("  top kernels (GPU ms per step, launches per step):")
        lines += [f"    {ms:8.3f} {n:5d}  {cat:26s} {name[:100]}" for name, ms, n, cat in r["top_kernels"][:25]]
    if "trace" in r:
        lines += [f"  trace          {r['trace']}", r["top_ops_table"]]
        lines += [f"  host ops by self CPU time ({'back to back' if r.get('trace_back_to_back') else 'synced'} steps):",
                  r.get("top_host_ops_table", "")]
    return lines


def render_baseline(b: dict) -> str:
    if "error" in b:
        return f"  baseline failed: {b['error']}"
    mfu = f"{100 * b['mfu']:.2f} %" if b.get("mfu") is not None else "n/a"
    mem = f", {b['peak_memory_gib']:.1f} GiB" if b.get("peak_memory_gib") is not None else ""
    loop = f"{100 * b['loop_mfu']:.2f} %" if b.get("loop_mfu") is not None else "n/a"
    return (f"  baseline: {b['name']}, {b['params'] / 1e9:.3f}B params ({b['n_layers']} x {b['dim']}, ffn "
            f"{b['ffn_dim']}, vocab {b['vocab']}), {b['rows']} x {b['seq_len']}: {b['step_time_s'] * 1e3:.1f} ms, "
            f"{b['tokens_per_s']:,.0f} tokens/s, {b['model_tflops']:.1f} TFLOP/s, MFU {mfu}{mem}; back to back "
            f"{b['loop_step_time_s'] * 1e3:.1f} ms, MFU {loop}")


def render_variants(r: dict) -> str:
    base = r.get("baseline", {})
    anchor = f"{100 * base['mfu']:.1f}" if base.get("mfu") is not None else "n/a"
    head = (f"profile: {r['config']}, one process, one row per variant (MFU counts real tokens; baseline MFU "
            f"{anchor} %)")
    loop_anchor = f"{100 * base['loop_mfu']:.1f}" if base.get("loop_mfu") is not None else "n/a"
    head += f"; back to back: loop ms, loop MFU %, the baseline's {loop_anchor} %"
    lines = [head, f"  {'variant':22s} {'step ms':>9s} {'tokens/s':>10s} {'images/s':>9s} {'TFLOP/s':>8s} "
                   f"{'MFU %':>6s} {'base %':>6s} {'loop ms':>8s} {'loop %':>6s} {'peak GiB':>8s} {'warm-up s':>9s}  sets"]
    for v in r["variants"]:
        if "error" in v:
            lines.append(f"  {v['variant']:22s} failed: {v['error']}")
            continue
        mfu = f"{100 * v['mfu']:6.1f}" if v["mfu"] is not None else "   n/a"
        loop_mfu = f"{100 * v['loop_mfu']:6.1f}" if v["loop_mfu"] is not None else "   n/a"
        lines.append(f"  {v['variant']:22s} {v['step_time_s'] * 1e3:9.1f} {v['tokens_per_s']:10,.0f} "
                     f"{v['images_per_s']:9.1f} {v['model_tflops']:8.1f} {mfu} {anchor:>6s} "
                     f"{v['loop_step_time_s'] * 1e3:8.1f} {loop_mfu} "
                     f"{v['peak_memory_gib']:8.1f} {v['warmup_s']:9.1f}  {';'.join(v['sets']) or '-'}")
    for v in r["variants"]:
        extras = render_extras(v) if "error" not in v else []
        if extras:
            lines += [f"  -- {v['variant']}:"] + extras
    lines += [render_baseline(b) for b in (base, r.get("baseline_packed")) if b]
    return "\n".join(lines)


def main(argv=None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank's breakdown of the config's layout
        from tools.bench_scaling import main as per_rank
        return per_rank(["--modes", "config"] + list(sys.argv[1:] if argv is None else argv))
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
    ap.add_argument("--trace-loop", action="store_true",
                    help="--trace records the steps back to back, as the training loop runs them (default: synced)")
    ap.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V;K=V",
                    help="profile this variant too, in this process (repeatable): its overrides on top of --set")
    ap.add_argument("--baseline", action="store_true",
                    help="also train the plain-PyTorch Llama of the same width and depth (tools/baseline_llama.py); "
                         "with --real-data also over the packed rows' document layouts")
    ap.add_argument("--parts", default="", metavar="VARIANT",
                    help="time each part (VLM stream, deep flow, shallow flows, heads+losses, skips) of this "
                         "variant ('all': every one; '' with no --variant: none)")
    ap.add_argument("--doc-mask", action="store_true",
                    help="give the synthetic batch doc_ids (an explicit mask); by default one document per row "
                         "runs as plain causal attention, which is the same mask")
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
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
