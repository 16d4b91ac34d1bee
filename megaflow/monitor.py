"""What a run shows while it trains: a progress bar (loss, throughput, ETA), log lines, and
TensorBoard (losses, bits/dim, lr, grad norm, tokens/s, images/s, MFU on GPU, slot fill, dropped
documents, memory, sample grids).

Only real work counts: tokens/s counts real (non-padding) tokens, images/s real images, and MFU
the FLOPs of real tokens. Slot fill = real tokens / (B x T) of the batches; dropped documents
(from the data loader's stats, must stay 0) are logged with it.

MFU = achieved model FLOP/s / the device's peak dense bf16 FLOP/s. Model FLOPs per step are
counted by `step_flops`: 6 x (multiply-adds of every matmul of both streams, the shallow flows and
the heads) per real token for forward + backward, plus attention's QK^T and AV over each document
piece (6 x 2 x L x width per token of a piece of L tokens, per layer: pairs across documents or
with padding are masked out and not counted; causal masking NOT discounted, as Megatron counts).
Frozen weights are counted in full: backward still computes activation gradients through them (it
skips only weight gradients, so MFU is a slight over-count in frozen stages; said here rather than
hidden). Throughput is this rank's count x dp (ranks' batches are equally full up to the epoch's
last step).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("megaflow")

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def piece_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the document pieces of a packed batch: doc_ids (B, T), -1 in padding -> (n,)."""
    real = doc_ids >= 0
    starts = real & torch.cat([torch.ones_like(real[:, :1]), doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)
    row_piece = torch.cumsum(starts.flatten().long(), 0) - 1  # piece index of every slot
    return torch.bincount(row_piece[real.flatten()], minlength=int(starts.sum()))


def model_counts(model) -> dict:
    """Per-token matmul and attention widths of `model` (a meta copy is enough), for `step_flops`."""
    cfg = model.cfg
    # remove_duplicate=False: a tied LM head shares the embedding's weight but is a matmul of its own
    matmul = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False)
                 if p.dim() == 2 and not name.startswith(("embed_tokens.", "flow_embed.", "fae.", "shallow.")))
    shallow = sum(p.numel() for n, p in model.shallow.named_parameters() if p.dim() == 2)
    attn_width = cfg.flow.n_layers * cfg.flow.dim
    if cfg.vlm is not None:
        attn_width += cfg.vlm.n_layers * cfg.vlm.n_heads * cfg.vlm.hd
    shallow_attn = cfg.fae.n_tokens * cfg.flow.n_shallow * cfg.flow.shallow_layers * cfg.flow.shallow_dim
    return {"matmul": matmul, "shallow": shallow, "attn_width": attn_width, "shallow_attn": shallow_attn}


def step_flops(model, batch: dict, counts: dict | None = None) -> float:
    """Model FLOPs of one forward + backward over the real tokens of `batch` (file docstring)."""
    c = counts or model_counts(model)
    if "doc_ids" in batch:
        lengths = piece_lengths(batch["doc_ids"]).double()
    else:  # an unpacked batch: every row one document of T tokens
        B, T = batch["tokens"].shape
        lengths = torch.full((B,), float(T), dtype=torch.float64)
    tokens = float(lengths.sum())
    n_img_tokens = int(batch["image_mask"].sum())
    flops = 6.0 * c["matmul"] * tokens + 6.0 * c["shallow"] * n_img_tokens
    flops += 6.0 * 2 * c["attn_width"] * float(lengths.pow(2).sum())  # sum over pieces of L * L
    flops += 6.0 * 2 * c["shallow_attn"] * n_img_tokens
    return flops


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


class Monitor:
    def __init__(self, out: Path, cfg, model, total: int, start: int = 0, rank: int = 0, dp: int = 1, world: int = 1,
                 data_stats: dict | None = None):
        """`model` may be a tensor-parallel shard or a pipeline stage: FLOPs are counted on a meta
        copy of the whole model. Throughput is global (this rank's batch x dp); MFU is per GPU.
        `data_stats` is the data loader's live `stats` dict (dropped documents are read from it)."""
        self.cfg, self.total, self.rank, self.dp, self.world = cfg, total, rank, dp, world
        self.data_stats = data_stats
        self.device = next(model.parameters()).device
        self.peak = peak_flops(self.device)
        self.writer = None
        self.bar = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"))
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=2.0)
        self.t_last = time.time()
        self.window = self._empty_window()
        from megaflow.model.starflow import STARFlow2
        with torch.device("meta"):
            self.model = STARFlow2(model.cfg)  # the whole model, for FLOP counting only
        self.counts = model_counts(self.model)

    @staticmethod
    def _empty_window() -> dict:
        return {"tokens": 0, "slots": 0, "images": 0, "flops": 0.0, "steps": 0}

    def step(self, step: int, batch: dict, metrics: dict, lr: float) -> None:
        """Count one step of `batch` (the host copy: counting the device batch would wait for the GPU)."""
        w = self.window
        w["tokens"] += self.dp * (int((batch["doc_ids"] >= 0).sum()) if "doc_ids" in batch else batch["tokens"].numel())
        w["slots"] += self.dp * batch["tokens"].numel()
        w["images"] += self.dp * int(batch["image_valid"].sum())
        w["flops"] += self.dp * step_flops(self.model, batch, self.counts) / self.world  # per GPU
        w["steps"] += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.train.log_every and step != self.total:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = max(time.time() - self.t_last, 1e-9)
        stats = {"tokens_per_s": w["tokens"] / dt, "images_per_s": w["images"] / dt, "step_s": dt / w["steps"],
                 "slot_fill": w["tokens"] / max(w["slots"], 1)}
        if self.data_stats is not None:
            stats["dropped_docs"] = self.data_stats.get("dropped_docs", 0)
        if self.peak:
            stats["mfu"] = w["flops"] / dt / self.peak
        if self.device.type == "cuda":
            stats["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource
            stats["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.t_last, self.window = time.time(), self._empty_window()
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/lr", lr, step)
            for k, v in stats.items():
                self.writer.add_scalar(f"perf/{k}", v, step)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", bpd=f"{metrics.get('bits_per_dim', 0):.2f}",
                                 tok_s=f"{stats['tokens_per_s']:.0f}", fill=f"{stats['slot_fill']:.2f}", refresh=False)
            log.info("step %d loss %.4f real tokens/s %.0f images/s %.1f slot fill %.3f dropped docs %s%s", step,
                     metrics["loss"], stats["tokens_per_s"], stats["images_per_s"], stats["slot_fill"],
                     stats.get("dropped_docs", "?"), f" mfu {stats['mfu']:.3f}" if "mfu" in stats else "")
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
