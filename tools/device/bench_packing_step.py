"""Training-step throughput on real-data packing layouts, before vs after token-budget packing.

    python3 tools/device/bench_packing_step.py --layouts layouts.json [--config configs/h200_1b.yaml] \
        [--steps 12] [--warmup 3] [--json out.json]

`layouts.json` comes from tools/bench_loader.py --layouts on the real data (Fashion-MNIST, the
config's geometry): for each batch, every row's document pieces as [length, image slots], from the old
fixed-count packer ("before": data.samples_per_batch documents per batch, overflow dropped) and from
the token-budget planner ("after"). This script needs no data pipeline (no Streaming on the GPU
machine): it rebuilds batches with exactly those layouts (random token ids and pixels; content
does not change the work) and trains the config's model on them with PlainEngine, bf16, one GPU:
  before        the old layouts + the dense (B, 1, T, T) mask (the code path before this change)
  packed-dense  the new layouts + the dense mask
  packed-flex   the new layouts + FlexAttention with one BlockMask per batch (megaflow/model/masks.py)
Reported per variant (median step time over --steps after --warmup): real (non-padding) tokens/s,
slot fill, images/s, MFU (megaflow.monitor.step_flops on real tokens / peak bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megaflow.config import load_config  # noqa: E402


def layout_batch(mcfg, rows: list, seq_len: int, max_images: int, g: torch.Generator) -> dict:
    """A batch (docs/DATA.md contract) whose rows hold pieces of the given [length, image slots]."""
    t, N = mcfg.tokens, mcfg.fae.n_tokens
    C, H = mcfg.fae.channels, mcfg.fae.image_size
    B, T, M = len(rows), seq_len, max_images
    tokens = torch.full((B, T), t.pad_id, dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, M, dtype=torch.bool)
    specials = [t.pad_id, t.bos_id, t.eos_id, t.boi_id, t.eoi_id, t.image_id]
    n_words = min([mcfg.vocab_size] + [s for s in specials if s >= 10]) - 10  # ids 10.. below the specials
    for r, pieces in enumerate(rows):
        offset, n_img = 0, 0
        for d, (length, slots) in enumerate(pieces):
            k = slots // N  # images of this piece
            text = length - k * (N + 2)
            piece = []
            whole = text >= 2  # a whole document: bos ... eos; else a cut piece of images
            if whole:
                piece.append(t.bos_id)
                text -= 2
            for i in range(k + 1):
                n = text // (k + 1) + (i < text % (k + 1))
                piece += (10 + torch.randint(0, n_words, (n,), generator=g)).tolist()
                if i < k:
                    piece += [t.boi_id] + [t.image_id] * N + [t.eoi_id]
            if whole:
                piece.append(t.eos_id)
            assert len(piece) == length, (length, k, len(piece))
            tokens[r, offset:offset + length] = torch.tensor(piece)
            doc_ids[r, offset:offset + length] = d
            position_ids[r, offset:offset + length] = torch.arange(length)
            valid[r, n_img:n_img + k] = True
            offset, n_img = offset + length, n_img + k
    image_mask = tokens == t.image_id
    nxt = tokens.roll(-1, 1)
    same = (doc_ids == doc_ids.roll(-1, 1)) & (doc_ids >= 0)
    targets = torch.where(same & ~image_mask.roll(-1, 1), nxt, -100)
    targets[:, -1] = -100
    images = (torch.rand(B, M, C, H, H, generator=g) * 2 - 1) * valid[..., None, None, None]
    return dict(tokens=tokens, targets=targets, position_ids=position_ids, doc_ids=doc_ids,
                image_mask=image_mask, images=images, image_valid=valid)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name, engine, model, batches, kernel, warmup, steps, peak, device) -> dict:
    from megaflow.model.masks import use_kernel
    from megaflow.monitor import step_flops
    mcfg = model.cfg
    g = torch.Generator().manual_seed(0)
    times, real, slots, images, flops = [], [], [], [], []
    with use_kernel(kernel):
        for i in range(warmup + steps):
            batch = {k: v.to(device) for k, v in batches[i % len(batches)].items()}
            B, M = batch["image_valid"].shape
            noise = torch.randn(B, M, mcfg.fae.n_tokens, mcfg.fae.latent_dim, generator=g).to(device)
            keep = torch.ones(B, device=device)
            sync(device)
            t0 = time.perf_counter()
            out = engine.train_step(batch, noise, keep, 1e-5)
            sync(device)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
                real.append(int((batch["doc_ids"] >= 0).sum()))
                slots.append(batch["tokens"].numel())
                images.append(int(batch["image_valid"].sum()))
                flops.append(step_flops(model, batch))
            elif i == 0:
                print(json.dumps({"variant": name, "first_step_s": round(dt, 2), "loss": float(out["loss"])}), flush=True)
    total = sum(times)
    res = {"variant": name, "kernel": kernel, "step_s_median": statistics.median(times),
           "real_tokens_per_s": sum(real) / total, "slots_per_s": sum(slots) / total,
           "slot_fill": sum(real) / sum(slots), "images_per_s": sum(images) / total,
           "mfu": (sum(flops) / total / peak) if peak else None, "steps": steps}
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--config", default="configs/h200_1b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["before", "packed-dense", "packed-flex"])
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of this script")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import dataclasses

    from megaflow.model.starflow import build_model
    from megaflow.monitor import peak_flops
    from megaflow.train import PlainEngine, pick_dtype
    cfg = load_config(args.config, args.overrides)
    layouts = json.load(open(args.layouts))
    device = torch.device(args.device)
    mcfg = cfg.model
    if "vocab_size" in layouts.get("tokenizer", {}):  # the real tokenizer's vocabulary (as with_tokenizer does)
        tok = layouts["tokenizer"]
        special = dataclasses.replace(mcfg.tokens, **{k: tok[k] for k in ("pad_id", "bos_id", "eos_id", "boi_id",
                                                                          "eoi_id", "image_id")})
        mcfg = dataclasses.replace(mcfg, vlm=dataclasses.replace(mcfg.vlm, vocab_size=tok["vocab_size"]), tokens=special)
    model = build_model(mcfg, device, seed=cfg.train.seed)
    engine = PlainEngine(model, cfg, pick_dtype(cfg.train.dtype, device) if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(1)
    n = args.warmup + args.steps
    batches = {key: [layout_batch(model.cfg, rows, cfg.data.seq_len, cfg.data.max_images, g) for rows in layouts[key][:n]]
               for key in ("before", "after")}
    peak = peak_flops(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__, "config": args.config,
              "overrides": args.overrides, "variants": {}}
    for name in args.variants:
        key, kernel = ("before", "dense") if name == "before" else ("after", name.split("-")[1])
        result["variants"][name] = run_variant(name, engine, model, batches[key], kernel, args.warmup, args.steps,
                                               peak, device)
    v = result["variants"]
    dtype = str(engine.dtype or torch.float32).removeprefix("torch.")
    print(f"\n{cfg.data.batch_size} x {cfg.data.seq_len} per step, {args.config}, {result['device']}, {dtype}")
    print("| variant | slot fill | real tokens/s | images/s | step s | MFU | real tokens/s vs before |")
    print("|---|---|---|---|---|---|---|")
    base = v.get("before", {}).get("real_tokens_per_s")
    for name, r in v.items():
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        ratio = f"{r['real_tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['slot_fill']:.3f} | {r['real_tokens_per_s']:.0f} | {r['images_per_s']:.0f} | "
              f"{r['step_s_median']:.3f} | {mfu} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
