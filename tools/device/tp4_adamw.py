"""The optimizer step of a graphed TP2 rank, one GPU (issue 17, TP rows; helper tp4): torch's fused capturable
AdamW + the bf16 refresh copy (what the TP-only step graph ran until session 9) against MainWeights' flat one-pass
AdamW (megaflow/flat_adamw.py), on h200_1b's parameters and on a half-size set of the same tensors (a TP2 rank's
shards: every 2-D block weight halved along its split dim), lr a 0-d device tensor as under train.step_graph.
GPU time by CUDA events over 20 back-to-back steps after 3. Usage: python3 tools/device/tp4_adamw.py [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from megaflow.config import load_config
from megaflow.model.starflow import build_model
from megaflow.optim import MainWeights, param_groups


def _halved(model: torch.nn.Module) -> torch.nn.Module:
    """A module holding one parameter per model parameter, each 2-D weight of a block halved (a TP2 shard)."""
    holder = torch.nn.Module()
    for i, (name, p) in enumerate(model.named_parameters()):
        shape = list(p.shape)
        if p.dim() == 2 and (".vlm_layers." in name or ".flow_layer." in name or "embed" in name or "lm_head" in name):
            shape[0 if shape[0] % 2 == 0 else 1] //= 2
        holder.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(shape, device=p.device) * 0.02))
    return holder


def time_step(module: torch.nn.Module, flat: bool, device: torch.device, steps: int = 20) -> float:
    tcfg = load_config("configs/h200_1b.yaml").train
    w = MainWeights(module, param_groups(module, tcfg.weight_decay), tcfg, torch.bfloat16)
    w.flat_step = flat
    w.flat_main_grad.normal_()
    lr = torch.tensor(3e-4, device=device)
    for g in w.optimizer.param_groups:  # as StepGraph sets them (capturable: CUDA only)
        g["capturable"], g["lr"] = device.type == "cuda", lr
    for _ in range(3):
        w.clip_and_step(1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        w.clip_and_step(1.0)
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    return (time.perf_counter() - t0) * 1e3 / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny config (a CPU check of the script)")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_config("configs/tiny.yaml" if args.tiny else "configs/h200_1b.yaml")
    model = build_model(cfg.model, device)
    for name, module in (("one GPU's parameters", model), ("a TP2 rank's shards (half)", _halved(model))):
        n = sum(p.numel() for p in module.parameters())
        fused, flat = time_step(module, False, device), time_step(module, True, device)
        print(f"SUMMARY adamw {name}: {n / 1e6:.0f} M parameters, {len(list(module.parameters()))} tensors: torch fused "
              f"AdamW + refresh {fused:.2f} ms, flat one-pass {flat:.2f} ms ({fused - flat:+.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
