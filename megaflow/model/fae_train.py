"""The FAE's own training phase (before STARFlow2 trains), its checkpoint files and a digits CLI.

What it does: `train_fae` trains an 'fae'-mode FAE (encoder 'conv' jointly with the compression
layer and both decoders; an 'hf:' encoder stays frozen) on an in-memory image tensor with AdamW;
`save_fae` / `load_fae` write and read {'config': asdict(cfg), 'state_dict': ...};
`python -m megaflow.model.fae_train --config configs/fae_digits.yaml --steps N --out PATH` trains
on scikit-learn's `load_digits`.

What it does not do: streaming data, multiple processes, or training the flows. scikit-learn is
imported only inside `load_digits_images`, so the model package stays pure torch.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
import yaml

from megaflow.model.fae import FAE, FAEConfig


def load_digits_images(image_size: int) -> torch.Tensor:
    """scikit-learn's 1797 digits (8x8, values 0..16) as (N, 1, image_size, image_size) in [-1, 1]."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded
    x = torch.from_numpy(load_digits().images).float()  # (N, 8, 8)
    x = x.unsqueeze(1) / 8.0 - 1.0  # (N, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)  # (N, 1, S, S)
    return x.clamp(-1, 1)


def to_unit_range(images: torch.Tensor, cfg: FAEConfig) -> torch.Tensor:
    """uint8 images (0..255) or float images in [-1, 1] -> float (N, C, S, S) in [-1, 1], shape checked."""
    want = (cfg.channels, cfg.image_size, cfg.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must have shape (N, {want[0]}, {want[1]}, {want[2]}) for this FAEConfig, "
                         f"got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    images = images.float()
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"float images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return images


def train_fae(cfg: FAEConfig, images: torch.Tensor, steps: int, lr: float = 1e-3, batch_size: int = 64,
              seed: int = 0, out_path: str | None = None,
              min_lr: float | None = None, log_every: int = 0) -> tuple[FAE, list[dict[str, float]]]:
    """Train an FAE from a fresh seeded init; returns (model in eval mode, per-step loss history).

    Deterministic for a seed: it seeds the init, the batch order and the latent noise. The learning
    rate is `lr` throughout, or with `min_lr` a cosine from `lr` at the first step to `min_lr` at the
    last (a fixed budget ends better annealed than at full rate). `log_every` > 0 prints the step,
    its loss and the seconds so far every that many steps (long runs on a CPU).
    """
    if cfg.mode != "fae":
        raise ValueError(f"train_fae needs fae.mode='fae', got {cfg.mode!r} (pixels mode has no parameters)")
    images = to_unit_range(images, cfg)
    torch.manual_seed(seed)
    model = FAE(cfg)
    model.init_weights()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    end = lr if min_lr is None else min_lr
    gen = torch.Generator().manual_seed(seed)
    history = []
    t0 = time.time()
    model.train()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        for group in opt.param_groups:
            group["lr"] = end + (lr - end) * 0.5 * (1 + math.cos(math.pi * step / max(steps - 1, 1)))
        losses = model.loss(images[idx])
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
        if log_every and (step + 1) % log_every == 0:
            print(f"fae step {step + 1}/{steps} loss {history[-1]['loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    if out_path is not None:
        save_fae(model, out_path)
    return model, history


def save_fae(model: FAE, path: str) -> None:
    """Write {'config': asdict(cfg), 'state_dict': ...} with torch.save."""
    torch.save({"config": asdict(model.cfg), "state_dict": model.state_dict()}, path)


def load_fae(path: str, map_location: str = "cpu") -> FAE:
    """Rebuild an FAE from a `save_fae` file; returned in eval mode, not frozen."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = FAE(FAEConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_config(path: str) -> tuple[FAEConfig, dict]:
    """Read a YAML file with an `fae:` section (FAEConfig fields) and an optional `train:` section."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    known = set(FAEConfig.__dataclass_fields__)
    fae = doc.get("fae", {})
    unknown = sorted(set(fae) - known)
    if unknown:
        raise ValueError(f"{path}: unknown fae keys {unknown}; known: {sorted(known)}")
    return FAEConfig(**fae), doc.get("train", {})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the FAE on scikit-learn's digits.")
    ap.add_argument("--config", required=True, help="YAML with an fae: section and an optional train: section")
    ap.add_argument("--steps", type=int, help="optimizer steps (default: train.steps, else 500)")
    ap.add_argument("--lr", type=float, help="AdamW learning rate (default: train.lr, else 1e-3)")
    ap.add_argument("--batch-size", type=int, help="images per step (default: train.batch_size, else 64)")
    ap.add_argument("--min-lr", type=float, help="end of a cosine learning-rate decay (default: train.min_lr, "
                    "else a constant rate)")
    ap.add_argument("--seed", type=int, help="seed of init, batches and noise (default: train.seed, else 0)")
    ap.add_argument("--out", help="where to save the trained FAE (torch.save file); nothing saved if unset")
    args = ap.parse_args(argv)
    cfg, train = load_config(args.config)

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else train.get(name, default)

    images = load_digits_images(cfg.image_size)
    if cfg.channels == 3:
        images = images.expand(-1, 3, -1, -1)  # (N, 3, S, S)
    held_out, train_images = images[:256], images[256:]
    t0 = time.time()
    model, history = train_fae(cfg, train_images, steps=pick("steps", 500), lr=pick("lr", 1e-3),
                               batch_size=pick("batch_size", 64), seed=pick("seed", 0), out_path=args.out,
                               min_lr=pick("min_lr", None))
    with torch.no_grad():
        ev = model.loss(held_out)
    first = history[0]["loss"] if history else float("nan")
    print(f"trained {len(history)} steps in {time.time() - t0:.1f}s; train loss {first:.4f} -> "
          f"{history[-1]['loss'] if history else float('nan'):.4f}; held-out pixel_mse "
          f"{ev['pixel_mse'].item():.4f} feature_mse {ev['feature_mse'].item():.4f}")
    if args.out:
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
