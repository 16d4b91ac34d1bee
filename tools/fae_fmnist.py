"""An FAE latent space on real data (Fashion-MNIST), built the way STARFlow2 builds one: a frozen
visual encoder, one compression layer, decoders. No pretrained vision weights exist offline, so the
encoder is trained here first, supervised on the training split, and saved as a Hugging Face
checkpoint (`save_pretrained`) that the FAE and the STARFlow2 run read as `fae.encoder: hf:<dir>`.

    python tools/fae_fmnist.py encoder --out data_cache/encoders/fmnist_vit --epochs 2   # 1. the encoder
    python tools/fae_fmnist.py fae --config configs/fae_fmnist32.yaml --out data_cache/fae/fmnist32.pt
    megaflow train --config configs/starflow_fae_fmnist32.yaml                  # 3. STARFlow2 in it

1. `encoder`: a small DINOv2-architecture ViT (transformers' Dinov2Model, 4x4 patches of the
   28x28 images centre-padded to 32x32) with a linear head on its mean patch token, trained to
   classify the training split (AdamW, one-cycle); the head is dropped, the ViT saved with a
   preprocessor_config.json whose mean/std (0.5) make its input the [-1, 1] image itself.
   Prints the test accuracy of the head.
2. `fae`: megaflow.model.fae_train.train_fae over the frozen encoder on the training split (the
   config's train: steps, lr, min_lr (cosine decay), batch_size, seed; progress every 50 steps),
   saved for `model.fae.checkpoint`; prints and writes (--json) the reconstruction PSNR on
   held-out test images (peak-to-peak 2 for images in [-1, 1]).
On a CPU shared with other jobs, run each stage with OMP_NUM_THREADS=1 (docs/benchmarks.md, "The
FAE-latent run on real Fashion-MNIST": two spinning OpenMP threads were 7x slower than one).
What it does not do: train STARFlow2 (megaflow train does, with the configs above).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.model.fae_train import load_config, save_fae, train_fae  # noqa: E402
from megaflow.quality import real_images  # noqa: E402


def build_vit(image_size: int, patch_size: int, dim: int, layers: int, heads: int):
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * dim, patch_size=patch_size, image_size=image_size, num_channels=3)
    return Dinov2Model(cfg)


def train_encoder(args) -> None:
    torch.manual_seed(args.seed)
    x, y, names = real_images("fashion_mnist", "train", args.image_size, 1)  # (N, 1, S, S) in [-1, 1]
    xt, yt, _ = real_images("fashion_mnist", "test", args.image_size, 1)
    vit = build_vit(args.image_size, args.patch_size, args.dim, args.layers, args.heads)
    head = nn.Linear(args.dim, len(names))
    n_patch = (args.image_size // args.patch_size) ** 2

    def logits(images):
        h = vit(pixel_values=images.expand(-1, 3, -1, -1)).last_hidden_state[:, -n_patch:]  # (B, N, E)
        return head(h.mean(1))  # (B, classes)

    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    steps = min(args.epochs * math.ceil(len(x) / args.batch_size), args.max_steps or 1 << 30)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    t0, step = time.time(), 0
    vit.train()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=g).split(args.batch_size):
            if step == steps:
                break
            loss = F.cross_entropy(logits(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    vit.eval()
    with torch.no_grad():
        acc = torch.cat([logits(c).argmax(1) for c in xt.split(500)]).eq(yt).float().mean().item()
    out = Path(args.out)
    vit.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    result = {"test_accuracy": acc, "steps": steps, "seconds": time.time() - t0}
    (out / "train_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def psnr(model, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of FAE reconstructions of images in [-1, 1] (peak-to-peak 2)."""
    with torch.no_grad():
        rec = torch.cat([model.decode(model.encode(c)).clamp(-1, 1) for c in images.split(250)])
    mse = (rec - images).pow(2).flatten(1).mean(1).clamp(min=1e-10)  # (N,)
    return float((10 * torch.log10(4.0 / mse)).mean())


def train_fae_fmnist(args) -> None:
    cfg, train = load_config(args.config)
    x, _, _ = real_images("fashion_mnist", "train", cfg.image_size, cfg.channels)
    xt, _, _ = real_images("fashion_mnist", "test", cfg.image_size, cfg.channels)
    held_out = xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:args.held_out]]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before training: nothing to lose at the end
    t0 = time.time()
    model, history = train_fae(cfg, x, steps=args.steps or train.get("steps", 1000), lr=train.get("lr", 1e-3),
                               batch_size=train.get("batch_size", 64), seed=train.get("seed", 0),
                               min_lr=train.get("min_lr"), log_every=50)
    save_fae(model, args.out)
    with torch.no_grad():
        ev = model.loss(held_out[:500])
    result = {"steps": len(history), "seconds": time.time() - t0, "held_out_images": len(held_out),
              "psnr_db": psnr(model, held_out), "pixel_mse": ev["pixel_mse"].item(),
              "feature_mse": ev["feature_mse"].item(), "train_loss_first": history[0]["loss"],
              "train_loss_last": history[-1]["loss"], "out": args.out}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser("encoder", help="train the frozen encoder, supervised, and save it (save_pretrained)")
    enc.add_argument("--out", required=True)
    enc.add_argument("--image-size", type=int, default=32)
    enc.add_argument("--patch-size", type=int, default=4)
    enc.add_argument("--dim", type=int, default=64)
    enc.add_argument("--layers", type=int, default=2)
    enc.add_argument("--heads", type=int, default=4)
    enc.add_argument("--epochs", type=int, default=1)
    enc.add_argument("--max-steps", type=int, default=0, help="stop the epochs after this many steps (0 = no limit)")
    enc.add_argument("--batch-size", type=int, default=128)
    enc.add_argument("--lr", type=float, default=2e-3)
    enc.add_argument("--seed", type=int, default=0)
    fae = sub.add_parser("fae", help="train the FAE over the frozen encoder; reconstruction PSNR on held-out images")
    fae.add_argument("--config", required=True, help="YAML with an fae: section (encoder: hf:<dir>) and train:")
    fae.add_argument("--out", required=True, help="the FAE file (model.fae.checkpoint of the STARFlow2 run)")
    fae.add_argument("--steps", type=int, default=0, help="optimizer steps (default: train.steps)")
    fae.add_argument("--held-out", type=int, default=2000, help="test images for the PSNR")
    fae.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    if args.cmd == "encoder":
        train_encoder(args)
    else:
        train_fae_fmnist(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
