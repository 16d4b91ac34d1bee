"""What a run shows while it trains: a progress bar (loss, throughput, ETA), log lines, and
TensorBoard (losses, bits/dim, lr, grad norm, tokens/s, images/s, MFU on GPU, memory, sample grids).

MFU = achieved model FLOP/s / the device's peak dense bf16 FLOP/s. Model FLOPs per step are
counted by `step_flops`: 6 x (multiply-adds of every matmul of both streams, the shallow flows and
the heads) per token for forward + backward, plus attention's QK^T and AV (6 x 2 x T x width per
token per layer, causal masking NOT discounted, as Megatron counts). Frozen weights are counted in
full: backward still computes activation gradients through them (it skips only weight gradients,
so MFU is a slight over-count in frozen stages; said here rather than hidden).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("megaflow")

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def step_flops(model, batch: dict) -> float:
    """Model FLOPs of one forward + backward over `batch` (see the file docstring)."""
    cfg = model.cfg
    B, T = batch["tokens"].shape
    tokens = B * T
    matmul = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.startswith(("embed_tokens.", "flow_embed.", "fae.", "shallow.")):
            matmul += p.numel()
    n_img_tokens = int(batch["image_mask"].sum())
    shallow = sum(p.numel() for n, p in model.shallow.named_parameters() if p.dim() == 2)
    flops = 6.0 * matmul * tokens + 6.0 * shallow * n_img_tokens
    attn_width = 0
    if cfg.vlm is not None:
        attn_width += cfg.vlm.n_layers * cfg.vlm.n_heads * cfg.vlm.hd
    attn_width += cfg.flow.n_layers * cfg.flow.dim
    flops += 6.0 * 2 * T * attn_width * tokens
    N = cfg.fae.n_tokens
    flops += 6.0 * 2 * N * cfg.flow.n_shallow * cfg.flow.shallow_layers * cfg.flow.shallow_dim * n_img_tokens
    return flops


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


class Monitor:
    def __init__(self, out: Path, cfg, model, total: int, start: int = 0, rank: int = 0, dp: int = 1, world: int = 1):
        """`model` may be a tensor-parallel shard or a pipeline stage: FLOPs are counted on a meta
        copy of the whole model. Throughput is global (this rank's batch x dp); MFU is per GPU."""
        self.cfg, self.total, self.rank, self.dp, self.world = cfg, total, rank, dp, world
        self.device = next(model.parameters()).device
        self.peak = peak_flops(self.device)
        self.writer = None
        self.bar = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"))
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)
        self.flops_cache = None
        self.t_last = time.time()
        self.window = {"tokens": 0, "images": 0, "flops": 0.0, "steps": 0}
        from megaflow.model.starflow import STARFlow2
        with torch.device("meta"):
            self.model = STARFlow2(model.cfg)  # the whole model, for FLOP counting only

    def step(self, step: int, batch: dict, metrics: dict, lr: float) -> None:
        if self.flops_cache is None:
            self.flops_cache = step_flops(self.model, batch)
        w = self.window
        w["tokens"] += self.dp * (int((batch["doc_ids"] >= 0).sum()) if "doc_ids" in batch else batch["tokens"].numel())
        w["images"] += self.dp * int(batch["image_valid"].sum())
        w["flops"] += self.dp * self.flops_cache / self.world  # per GPU
        w["steps"] += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.train.log_every and step != self.total:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = max(time.time() - self.t_last, 1e-9)
        stats = {"tokens_per_s": w["tokens"] / dt, "images_per_s": w["images"] / dt, "step_s": dt / w["steps"]}
        if self.peak:
            stats["mfu"] = w["flops"] / dt / self.peak
        if self.device.type == "cuda":
            stats["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource
            stats["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.t_last, self.window = time.time(), {"tokens": 0, "images": 0, "flops": 0.0, "steps": 0}
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/lr", lr, step)
            for k, v in stats.items():
                self.writer.add_scalar(f"perf/{k}", v, step)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", bpd=f"{metrics.get('bits_per_dim', 0):.2f}",
                                 tok_s=f"{stats['tokens_per_s']:.0f}", refresh=False)
        self.last_stats = stats

    def eval(self, step: int, metrics: dict) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"eval/{k}", v, step)
        log.info("step %d eval %s", step, {k: round(v, 4) for k, v in metrics.items()})
        self.last_eval = metrics

    def image_grid(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """grid (C, H, W) in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def samples(self, step: int, model, tok, cfg) -> None:
        from megaflow.quality import class_prompts, sample_grid
        prompts = class_prompts(cfg, tok)
        if prompts is None or self.writer is None:
            return
        grid = sample_grid(model, prompts[1], per_class=4, guidance=cfg.train.guidance, seed=step)
        self.image_grid("samples", grid, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
