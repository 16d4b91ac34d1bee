"""`megaflow train`: the training loop.

One build order, visible in `build` below (one process; several: parallel/runtime.py): meta
build -> layer swaps (TP / FP8, parallel/) -> stage split (PP) -> materialise + init or load ->
optimizer wrap (ZeRO) -> loop.

The loop is deterministic: the input noise and the condition-dropout mask of step s are drawn
from a generator seeded by (seed, s, dp rank), the LR is a function of s, and the data loader's
state is saved with every checkpoint, so `--resume` continues bit for bit on CPU.

    megaflow train                                  # the embedded default (configs/default.yaml)
    megaflow train --config configs/X.yaml --set train.steps=100 --resume
    torchrun --nproc_per_node 4 -m megaflow.cli train --config configs/X.yaml --set parallel.tp=2

Several processes (torchrun or srun): data x tensor x pipeline parallelism and ZeRO from
cfg.parallel; the ranks and their build live in parallel/runtime.py, the engine without ZeRO in
parallel/engine.py, sharded checkpoints (every rank its own pieces; they load at any layout and
in one process) in parallel/checkpoint.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from data_pipeline.schema import BadSampleError
from data_pipeline.tokenizer import TokenizerError
from megaflow.checkpoint import (CheckpointError, find_latest, list_checkpoints, load_file, nonfinite, read_meta,
                                 resolve, save_checkpoint)
from megaflow.config import Config, ConfigError, config_from_dict, load_config, to_dict
from megaflow.model.config import ModelConfig, SpecialTokens
from megaflow.model.starflow import STARFlow2, apply_stage, metric_tensors, read_metrics
from megaflow.optim import lr_at, set_lr

log = logging.getLogger("megaflow")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


# ----- set-up ---------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA device is available; use train.device=auto or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16}[name] if name in ("fp32", "bf16") else _bad_dtype(name)


def _bad_dtype(name):
    raise ConfigError(f"train.dtype={name!r} must be 'auto', 'fp32' or 'bf16'")


def load_run_tokenizer(cfg: Config):
    from data_pipeline.tokenizer import load_tokenizer
    return load_tokenizer(cfg.data.tokenizer)


def with_tokenizer(mcfg: ModelConfig, tok) -> ModelConfig:
    """The model config with the vocabulary size and special ids of the tokenizer."""
    special = SpecialTokens(pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, boi_id=tok.boi_id,
                            eoi_id=tok.eoi_id, image_id=tok.image_id)
    if mcfg.vlm is not None:
        return dataclasses.replace(mcfg, vlm=dataclasses.replace(mcfg.vlm, vocab_size=tok.vocab_size), tokens=special)
    return dataclasses.replace(mcfg, flow=dataclasses.replace(mcfg.flow, n_cond_tokens=tok.vocab_size), tokens=special)


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints: the same key gives the same stream in every
    process and run (the hash of a tuple of ints does not depend on PYTHONHASHSEED)."""
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF)


def step_randomness(cfg: Config, model_cfg: ModelConfig, batch: dict, step: int, dp_rank: int, device):
    """Input noise (B, M, N, D) (flow.dequantization: standard normal, or uniform in [0, 1)) and the
    condition-keep mask (B,) of one step: a pure function of (seed, step, dp rank), identical on
    tensor/pipeline peers, so resume is exact without RNG state."""
    g = keyed_generator(cfg.train.seed, step, dp_rank)
    B, M = batch["image_valid"].shape
    shape = (B, M, model_cfg.fae.n_tokens, model_cfg.fae.latent_dim)
    # 'uniform': u ~ U[0, 1) of the pixels' dequantisation; 'gaussian': N(0, 1), scaled in the model
    noise = torch.rand(shape, generator=g) if model_cfg.flow.dequantization == "uniform" else torch.randn(shape, generator=g)
    keep = (torch.rand(B, generator=g) >= model_cfg.flow.cond_drop).float()
    return host_to_device(noise, device), host_to_device(keep, device)


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: on CUDA it is staged in pinned memory
    and copied asynchronously (a copy from pageable memory waits for the GPU's queue to drain, a host
    sync in every step)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def to_device(batch: dict, device) -> dict:
    return {k: (host_to_device(v, device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def build(cfg: Config, tok, device, load_from: Optional[Path] = None) -> STARFlow2:
    """Build order: meta build -> (parallel layer swaps) -> materialise -> init or load. A sharded
    checkpoint's weights (`load_from`) are loaded later, with the optimizer state
    (parallel.checkpoint.load_engine_state)."""
    from parallel.checkpoint import is_sharded
    mcfg = with_tokenizer(cfg.model, tok)
    try:
        with torch.device("meta"):
            model = STARFlow2(mcfg)  # an hf: encoder's architecture from its config.json, no weights yet
        model.to_empty(device=device)
        torch.manual_seed(cfg.train.seed)
        model.init_weights()  # an hf: encoder's pretrained weights are read here (FAE.init_weights)
        if load_from is None and mcfg.fae.checkpoint:  # a trained FAE; a resumed run's checkpoint holds it
            model.fae.load_trained(mcfg.fae.checkpoint)
            log.info("FAE weights from %s", mcfg.fae.checkpoint)
    except ValueError as e:  # an encoder or FAE file that does not fit the config
        raise ConfigError(str(e)) from e
    if load_from is not None and not is_sharded(load_from):
        state = load_file(load_from, "model.pt", map_location=device)
        load_model_state(model, state, strict=True)  # resuming our own checkpoint: it must match exactly
    elif load_from is None and cfg.train.hf_lm:
        from megaflow.hf_import import load_hf_lm
        load_hf_lm(model, cfg.train.hf_lm)
    if cfg.train.init_from and load_from is None:
        src = resolve(cfg.train.init_from)
        load_weights(model, src, strict=False)
        log.info("initialised from %s", src)
    apply_stage(model, mcfg.stage)
    return model


def load_weights(model, ckpt: Path, strict: bool = True) -> None:
    """The weights of checkpoint `ckpt` (one-process model.pt or sharded state/, any layout) into a
    one-process model, in this process only."""
    from parallel.checkpoint import STATE, check_format, is_sharded
    check_format(ckpt)
    if not is_sharded(ckpt):
        load_model_state(model, load_file(ckpt, "model.pt", map_location=next(model.parameters()).device), strict)
        return
    from parallel.checkpoint_convert import load_weights as load_sharded_weights
    try:
        load_sharded_weights(model, ckpt / STATE, strict)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {e}") from e


def load_model_state(model, state: dict, strict: bool = True) -> None:
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"checkpoint tensor {bad[0]!r} has shape {tuple(state[bad[0]].shape)} but the model "
                              f"expects {tuple(own[bad[0]].shape)}: the checkpoint was made with another config")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # Transformer Engine's FP8 metadata
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ----- one engine: plain PyTorch (one process; multi-process runs use parallel/engine.py or zero.py) --
class PlainEngine:
    """Forward, backward, clip, AdamW. With `dp_group`, a data-parallel replica: the loss is
    normalised by the GLOBAL counts (summed over the group before the forward) and the gradients are
    SUMMED, so DP equals one process on the concatenated batch exactly (parallel/pipeline_step.py).

    Mixed precision (train.param_dtype, megaflow/optim.py MainWeights): bf16 parameters, fp32 main
    weights and gradients in the optimizer. Activation checkpointing and per-block torch.compile
    (megaflow/speed.py) are applied to the model here, as the config says.

    `train_step` never waits for the GPU: it returns 0-d tensors (loss, grad_norm, metrics), which
    the loop reads back at log steps (`read_metrics`)."""

    def __init__(self, model, cfg: Config, dtype, dp_group=None):
        from megaflow.optim import MainWeights, param_groups, resolve_bf16_grads, resolve_param_dtype
        from megaflow.speed import apply_speedups
        from megaflow.step_graph import StepGraph, check_step_graph
        self.model, self.cfg, self.dtype, self.dp_group = model, cfg, dtype, dp_group
        device = next(model.parameters()).device
        tcfg = cfg.train
        if cfg.parallel.backend == "te":  # Transformer Engine's layers: fp32 weights and eager unless asked
            tcfg = dataclasses.replace(tcfg, param_dtype="fp32" if tcfg.param_dtype == "auto" else tcfg.param_dtype,
                                       compile="off" if tcfg.compile == "auto" else tcfg.compile)
        try:
            self.param_dtype = resolve_param_dtype(tcfg.param_dtype, dtype, device)
            bf16_grads = resolve_bf16_grads(tcfg.bf16_grads, self.param_dtype, device, dp_group is not None)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        groups = param_groups(model, cfg.train.weight_decay)
        if not groups:
            raise ValueError("no trainable parameters in this curriculum stage; check model.stage")
        self.weights = MainWeights(model, groups, tcfg, self.param_dtype, bf16_grads=bf16_grads)
        self.optimizer = self.weights.optimizer
        if bf16_grads:  # each plain linear's weight-gradient GEMM writes into the flat bf16 buffer (before compile)
            from parallel.wgrad_fusion import apply_grad_writes
            apply_grad_writes([model], self.weights)
        self.params = self.weights.params  # fp32 main weights (the parameters themselves in fp32 runs)
        self.speedups = apply_speedups(model, tcfg, device)
        self.graph = None
        try:
            if check_step_graph(tcfg.step_graph, device, tcfg.compile_mode, dp_group is not None,
                                parallel=cfg.parallel):  # e.g. parallel.backend=te: refused by name
                self.graph = StepGraph(self._step, self.optimizer, device)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.fp8 = contextlib.nullcontext
        if cfg.parallel.te_fp8 != "off":  # Transformer Engine layers run their GEMMs in FP8 (forward only here)
            from parallel.backend import fp8_forward
            forward = fp8_forward(cfg.parallel.te_fp8, [model])
            self.fp8 = lambda: forward(0)

    def train_step(self, batch: dict, noise, keep, lr: float) -> dict:
        """One step (as one replayed CUDA graph under train.step_graph=on, megaflow/step_graph.py)."""
        if self.graph is not None:
            return self.graph(batch, noise, keep, lr)
        return self._step(batch, noise, keep, lr)

    def _step(self, batch: dict, noise, keep, lr) -> dict:
        self.model.train()
        set_lr(self.optimizer, lr)
        with torch.autocast(batch["tokens"].device.type, dtype=self.dtype, enabled=self.dtype is not None), \
                self.fp8():
            if self.dp_group is None:
                terms = self.model.terms(batch, noise, keep)
                counts = self.model.loss_counts(batch)
                loss = self.model.combine(terms, counts)
                metrics = metric_tensors(terms, counts, self.model.cfg)
            else:
                loss, metrics = self._global_loss(batch, noise, keep)
        self.weights.zero_grad()
        loss.backward()
        self.weights.grads_to_main()
        if self.dp_group is not None:
            from parallel.data_parallel import allreduce_gradients
            allreduce_gradients(self.params, self.dp_group, average=False)
        # Clipping, then AdamW. NaN/Inf anywhere in the gradients makes the norm non-finite: the update is
        # skipped (on CUDA the fused AdamW is gated on the device and applies the clipping itself, nothing
        # is read back). With dp_group the gradients were summed above, so every replica sees the same
        # norm and skips the same steps.
        norm, skipped = self.weights.clip_and_step(self.cfg.train.grad_clip)
        value = metrics.pop("global_loss", loss.detach())
        return {"loss": value, "grad_norm": norm.detach(), "skipped": skipped, **metrics}

    def model_state_dict(self, copy: bool = True) -> dict:
        """The model's state with the fp32 main weights: what model.pt holds (full precision);
        copy=False: nothing copied, to read only (MainWeights.full_precision_state)."""
        return self.weights.full_precision_state(self.model, copy)

    def _global_loss(self, batch: dict, noise, keep):
        """This replica's share of the global-batch loss; the returned loss and metrics are global."""
        import torch.distributed as dist
        from parallel.pipeline_step import TERM_KEYS, global_counts
        m = self.model
        counts = global_counts(m, batch, self.dp_group)
        terms = m.terms(batch, noise, keep)
        loss = m.combine(terms, counts)
        totals = torch.stack([loss.detach().double()] + [terms[k].detach().double() if k in terms
                                                         else loss.new_zeros((), dtype=torch.float64) for k in TERM_KEYS])
        dist.all_reduce(totals, group=self.dp_group)
        summed = {k: totals[1 + j] for j, k in enumerate(TERM_KEYS) if k in terms}
        return loss, {**metric_tensors(summed, counts, m.cfg), "global_loss": totals[0].float()}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from megaflow.optim import fuse_legacy_optimizer, group_names
        names = group_names(self.model, [{"params": g} for g in self._group_params()])
        self.optimizer.load_state_dict(fuse_legacy_optimizer(state["optimizer"], names))  # (an optim.pt from before the fused projections too)

    def _group_params(self) -> list:
        """The model parameters of each optimizer group, in its order."""
        it = iter(self.weights.model_params)
        return [[next(it) for _ in g["params"]] for g in self.optimizer.param_groups]


# ----- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, cfg: Config, device, dtype, max_batches: int, engine=None) -> dict:
    """Text loss and image bits/dim on held-out batches (fixed noise: comparable across steps).
      bits_per_dim: the flow's NLL under the run's training input noise (flow.dequantization), plus
        log 128 per dimension in 'pixels' mode. With Gaussian noise it is a continuous NLL whose floor
        is ~4.73 for a perfect model: NOT on TarFlow's scale.
      bits_per_dim_tarflow ('pixels' mode): bits/dim (uniform dequantisation, TarFlow scale): -log2 of
        the density of x = (p + u) / 128 - 1 (p the 8-bit pixels, u ~ U[0, 1)) per dimension, plus
        log2 128; the images are dequantised here and the model gets no further noise. It is the same
        pass as bits_per_dim when the run trains with flow.dequantization='uniform'.
    Multi-process (`engine`: a ParallelEngine or ZeroEngine): collective, every rank calls it and
    gets the figures; the model stays split (parallel/evaluate.py), nothing is gathered."""
    from megaflow.model.fae import dequantize
    from megaflow.model.starflow import bits_per_dim
    model.eval()
    pixels = model.cfg.fae.mode == "pixels"
    own_pass = pixels and model.cfg.flow.dequantization != "uniform"  # the TarFlow figure needs its own pass
    sums = {"text_sum": 0.0, "flow_sum": 0.0, "tarflow_sum": 0.0, "text": 0, "dims": 0}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = to_device(batch, device)
        noise, _ = step_randomness(cfg, model.cfg, batch, -1 - i, 0, device)
        terms, counts = _eval_terms(model, engine, batch, noise, device, dtype)
        for k in ("text_sum", "flow_sum"):
            sums[k] += float(terms.get(k, 0.0))
        sums["text"] += int(counts["text"])
        sums["dims"] += int(counts["dims"])
        if own_pass:
            deq = {**batch, "images": dequantize(batch["images"], eval_dequantization(cfg, batch, i, device))}
            sums["tarflow_sum"] += float(_eval_terms(model, engine, deq, torch.zeros_like(noise), device, dtype)[0]["flow_sum"])
    out = {}
    if sums["dims"]:
        out["bits_per_dim"] = bits_per_dim(sums["flow_sum"] / sums["dims"], pixels)
        if pixels:
            tarflow = sums["tarflow_sum"] if own_pass else sums["flow_sum"]
            out["bits_per_dim_tarflow"] = bits_per_dim(tarflow / sums["dims"], True)
    if sums["text"]:
        out["text_loss"] = sums["text_sum"] / sums["text"]
    return out


def eval_dequantization(cfg: Config, batch: dict, i: int, device) -> torch.Tensor:
    """u ~ U[0, 1) of the images (B, M, C, H, W) of held-out batch i: fixed, so the TarFlow-scale
    bits/dim of two evaluations (and two layouts) see the same dequantised images."""
    g = keyed_generator(cfg.train.seed, -1 - i, -1)
    return torch.rand(batch["images"].shape, generator=g).to(device)


def _eval_terms(model, engine, batch: dict, noise, device, dtype) -> tuple:
    """(summed loss terms, counts) of one held-out batch: on the split model through `engine`, or here."""
    if engine is not None:
        from parallel.evaluate import eval_terms
        return eval_terms(engine, batch, noise, dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        terms = model.terms(batch, noise)
    return terms, model.loss_counts(batch)


# ----- the run --------------------------------------------------------------------------------------
def prepare_data(cfg: Config) -> None:
    """The built-in dataset and tokenizer, built once: under a file lock beside data.local, so the
    first process of every node can call it (node-local paths: each node builds its own copy; a
    shared filesystem: the first builds, the others find it)."""
    from megaflow.prepare import ensure_dataset, ensure_tokenizer, prepare_lock
    name, spec = cfg.train.dataset, cfg.data.tokenizer
    with prepare_lock(cfg.data.local):
        if name:
            ensure_dataset(name, cfg.data.local, "train", cfg.train.dataset_limit, cfg.data.seed,
                           cfg.train.dataset_mix, key="data.local")
            if cfg.train.eval_data:
                ensure_dataset(name, cfg.train.eval_data, "test", cfg.train.eval_limit, cfg.data.seed,
                               cfg.train.dataset_mix, key="train.eval_data")
        if spec.kind == "sentencepiece" and name:
            ensure_tokenizer(spec.path, cfg.data.local, cfg.train.tokenizer_vocab)


def save(out: Path, step: int, cfg: Config, model, engine, loader, history: list, tok, topo=None,
         saver=None) -> Optional[Path]:
    """One checkpoint. One process: model.pt and optim.pt. Several (`topo`): collective, every rank
    writes only its own shards into state/ (parallel/checkpoint.py), in the background with `saver`
    (an AsyncSave: the checkpoint is committed at the next save or the end of the run)."""
    main_rank = topo is None or topo.rank == 0

    def write_rest(d: Path):
        if not main_rank:
            return
        from megaflow.fp8 import fp8_state  # delayed FP8 scaling's amax histories (one process; else they restart)
        torch.save({"step": step, "loader": loader.state_dict(), "history": history,
                    "torch_rng": torch.get_rng_state(), "fp8": fp8_state(model) if topo is None else {}},
                   d / "trainer.pt")
        (d / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        tok.save(str(d / "tokenizer"))
        tokdir = d / "tokenizer"
        for f in tokdir.iterdir():  # flatten so meta.json lists every file
            os.replace(f, d / f"tokenizer.{f.name}")
        tokdir.rmdir()
    if topo is None:  # Transformer Engine's FP8 metadata stays out: model.pt loads under either backend
        full = engine.model_state_dict()  # fp32 main weights under mixed precision
        state = {k: v for k, v in full.items() if not k.endswith("_extra_state")}

        def write(d: Path):
            torch.save(engine.state_dict(), d / "optim.pt")
            torch.save(state, d / "model.pt")
            write_rest(d)
        return save_checkpoint(out / "checkpoints", step, write, cfg.train.keep_last)
    from parallel.checkpoint import FORMAT, layout_of, save_distributed, save_engine_state
    extra = {"parallel": layout_of(topo, cfg.parallel), "sharded": FORMAT}
    if saver is not None:
        saver.start(out / "checkpoints", step, engine, write_rest, cfg.train.keep_last, extra)
        return None

    def write_sharded(d: Path) -> dict:
        sums = save_engine_state(engine, d, topo)  # hashed as written: the commit does not read them back
        write_rest(d)
        return sums
    return save_distributed(out / "checkpoints", step, write_sharded, cfg.train.keep_last, topo, extra)


def setup_processes(cfg: Config, device: torch.device):
    """(device, topology): the topology is None for one process. Under torchrun / srun with more than
    one process: the process group, this rank's device and the TP x DP x PP topology."""
    from parallel.runtime import check_layout, init_distributed, launch_env
    from parallel.topology import Topology
    launch = launch_env()
    p = cfg.parallel
    if launch is None:
        if p.tp * p.pp > 1 or p.zero_stage:
            raise ConfigError(f"parallel.tp={p.tp}, pp={p.pp}, zero_stage={p.zero_stage} need several processes: "
                              f"launch with torchrun --nproc_per_node N (N a multiple of tp * pp = {p.tp * p.pp}) "
                              f"or srun, or set them to 1 / 0")
    try:  # before any group exists: the error, not a hang; also what TE's FP8 GEMMs cannot serve
        check_layout(p, launch.world_size if launch is not None else 1, cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if launch is None:
        return device, None
    try:
        device = init_distributed(launch, device, p.timeout_s)
        return device, Topology(tp=p.tp, pp=p.pp, flow_tp=p.flow_tp)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_parallel(cfg: Config, tok, device, dtype, topo, ckpt: Optional[Path]):
    """(model, engine) of this rank: initialised per stage (parallel/runtime.py), then, from a
    sharded checkpoint `ckpt` of any layout, every rank reads its own pieces of the weights and
    optimizer state (collective); init_from a sharded checkpoint: its weights, the same way. A
    one-process init_from, hf_lm or a trained FAE (model.fae.checkpoint): the one-process model is
    built on the CPU and sliced. An hf: encoder loads its weights in each stage's init_weights."""
    from megaflow.model.layers import fuse_legacy
    from parallel.checkpoint import check_format, is_sharded, load_engine_state
    from parallel.runtime import build_engine, build_stages
    full = init_from = None
    if ckpt is not None:
        check_format(ckpt)
        if not is_sharded(ckpt):  # a one-process checkpoint: its model.pt, sliced; AdamW state by name
            full = fuse_legacy(load_file(ckpt, "model.pt"))  # (written before the fused projections: fused here)
    elif cfg.train.init_from and not cfg.train.hf_lm and is_sharded(resolve(cfg.train.init_from)):
        init_from = resolve(cfg.train.init_from)  # each rank reads its own pieces, after the build
    elif cfg.train.init_from or cfg.train.hf_lm or cfg.model.fae.checkpoint:
        full = build(cfg, tok, torch.device("cpu")).state_dict()
    try:  # layout, schedule and step-graph errors (parallel/pipeline.py, schedules.py, megaflow/step_graph.py)
        model, stages, tied = build_stages(with_tokenizer(cfg.model, tok), cfg.parallel, topo, device,
                                           cfg.train.seed, full, cfg.data.seq_len)  # name the setting to change
        engine = build_engine(cfg, model, stages, tied, topo, dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if init_from is not None:
        load_engine_state(engine, init_from, topo, weights_only=True)
        if topo.rank == 0:
            log.info("initialised from %s", init_from)
    if ckpt is not None and is_sharded(ckpt):
        load_engine_state(engine, ckpt, topo)
    elif ckpt is not None:
        from parallel.checkpoint_convert import load_engine_from_one_process
        try:
            load_engine_from_one_process(engine, full, load_file(ckpt, "optim.pt"), with_tokenizer(cfg.model, tok),
                                         cfg.train, topo)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} (one process): {e}") from e
    return model, engine


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one out_dir (a fresh run there would prune some of the old run's
    checkpoints and leave newer ones that --resume and generate then pick), and fail early, naming
    the path, when out_dir cannot be written. Every rank checks the same files: all fail alike."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in train.out_dir and --overwrite deletes its checkpoints; "
                          "give one of them")
    ckpts = out / "checkpoints"
    found = list_checkpoints(ckpts)
    if found and not resume and not overwrite:
        raise ConfigError(f"train.out_dir={str(out)!r} already holds checkpoints of a run ({found[-1].name}, "
                          f"{len(found)} in all); continue that run with --resume, start over with --overwrite "
                          f"(deletes {str(ckpts)!r}), or set another train.out_dir")
    there = out.absolute()  # the nearest existing folder must take the run (nothing is created here)
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir={str(out)!r} cannot be written ({str(there)!r} is "
                          f"{'not a directory' if not there.is_dir() else 'not writable'}); choose another "
                          f"train.out_dir or fix its permissions")


def remove_checkpoints(out: Path) -> None:
    """--overwrite: megaflow's own checkpoints directory goes (renamed away first, so no reader sees
    half of it); nothing else in out_dir is touched."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        gone = out / f".checkpoints-overwritten-{os.getpid()}"
        os.replace(ckpts, gone)
        shutil.rmtree(gone)
        log.info("--overwrite: removed the previous run's checkpoints in %s", ckpts)


def nonfinite_state(engine, topo) -> Optional[str]:
    """Where this rank's weights or optimizer state hold NaN/Inf (a name), or None: what a save would
    write (under mixed precision the fp32 main weights, not the bf16 parameters)."""
    if topo is not None and hasattr(engine, "save"):  # ZeRO: this rank's fp32 master partitions, their moments
        from parallel.zero import master_partitions
        return (nonfinite(master_partitions(engine.optimizer), "fp32 master weights")
                or nonfinite(list(engine.optimizer.optimizer.state.values()), "optimizer"))
    # checked in place: under bf16 parameters the fp32 main weights are read, not copied (the save copies them once)
    return nonfinite(engine.model_state_dict(copy=False), "model") or nonfinite(engine.optimizer.state_dict(),
                                                                                "optimizer")


def check_finite(engine, topo, device, step: int, cfg: Config, out: Path) -> None:
    """Refuse to write checkpoint `step` when any rank's weights or optimizer state are not finite."""
    bad = nonfinite_state(engine, topo)
    if topo is not None:  # all ranks refuse together: a collective save would hang otherwise
        import torch.distributed as dist
        flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
        dist.all_reduce(flag)
        bad = bad or ("another rank's weights or optimizer state" if flag.item() else None)
    if bad is not None:
        raise FloatingPointError(f"NaN/Inf in {bad} after step {step}: no checkpoint is written; lower train.lr (now "
                                 f"{cfg.train.lr}) or check the data, and resume from the last good checkpoint in "
                                 f"{str(out / 'checkpoints')!r}")


def run(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    tcfg = cfg.train
    out = Path(tcfg.out_dir)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    device = pick_device(tcfg.device)
    if cfg.parallel.backend == "te" and device.type != "cuda":
        raise ConfigError(f"parallel.backend=te (Transformer Engine) needs a CUDA GPU, and this run is on "
                          f"{device.type} (train.device={tcfg.device!r}); use parallel.backend=local"
                          + (" and parallel.fp8=off" if cfg.parallel.fp8 != "off" else ""))
    if cfg.parallel.torch_fp8 and cfg.parallel.fp8_start_step and tcfg.step_graph != "off":
        raise ConfigError(f"parallel.fp8_start_step={cfg.parallel.fp8_start_step} switches FP8 on in the training "
                          f"loop, and train.step_graph={tcfg.step_graph!r} would keep the bf16 GEMMs it captured; set "
                          f"train.step_graph=off, or parallel.fp8_start_step=0")
    if cfg.parallel.torch_fp8:
        from megaflow.fp8 import check_fp8_device
        try:
            check_fp8_device(device)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if cfg.parallel.backend == "te":  # before any CUDA work: a cuDNN that torch loads first can break TE's
        from parallel.backend import import_te
        import_te()
    check_out_dir(out, resume, overwrite)  # before any process group: every rank checks, all fail alike
    from megaflow.stop import StopSignals
    signals = StopSignals().install()  # from here on SIGUSR1 / SIGTERM end the run at a step boundary, saved
    topo = None
    try:
        device, topo = setup_processes(cfg, device)
        return _run(cfg, resume, out, device, topo, overwrite, signals)
    finally:
        signals.restore()
        if topo is not None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _run(cfg: Config, resume: bool, out: Path, device, topo, overwrite: bool = False, signals=None) -> dict:
    from megaflow.stop import StopSignals
    from parallel.runtime import AnyRank, barrier, broadcast_value, is_node_main
    signals = signals or StopSignals()  # not installed: never set
    tcfg = cfg.train
    main_rank = topo is None or topo.rank == 0
    dtype = pick_dtype(tcfg.dtype, device)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            remove_checkpoints(out)
    if is_node_main():
        prepare_data(cfg)
    barrier(topo)  # the data and tokenizer exist before any rank reads them
    tok = load_run_tokenizer(cfg)
    dp_rank, dp = (topo.dp_rank, topo.dp) if topo is not None else (0, 1)
    from data_pipeline.loader import build_loader
    loader = build_loader(cfg.data, tok, dp_rank, dp, pin_memory=device.type == "cuda")  # pinned by data.prefetch's thread

    ckpt = broadcast_value(find_latest(out / "checkpoints") if resume and main_rank else None, topo)
    if resume and ckpt is None and main_rank:
        log.warning("--resume: no complete checkpoint in %s; starting from scratch", out / "checkpoints")
    if topo is None:
        from parallel.checkpoint import check_format, is_sharded, load_engine_state
        if ckpt is not None:
            check_format(ckpt)  # the old multi-process format: the command that converts it
        model = build(cfg, tok, device, ckpt)
        from parallel.backend import apply_fp8_layers
        apply_fp8_layers(model, cfg.parallel, device)  # after init or load: TE / FP8 layers take the same weights
        engine = PlainEngine(model, cfg, dtype)
        if ckpt is not None and is_sharded(ckpt):  # any layout's shards, read whole in this process
            load_engine_state(engine, ckpt)
        elif ckpt is not None:
            engine.load_state_dict(load_file(ckpt, "optim.pt"))
    else:
        from parallel.checkpoint import layout_of
        model, engine = build_parallel(cfg, tok, device, dtype, topo, ckpt)
        if main_rank:
            log.info("%d processes: %s", topo.world_size, layout_of(topo, cfg.parallel))
    start, history = 0, []
    if ckpt is not None:
        trainer = load_file(ckpt, "trainer.pt")
        start, history = trainer["step"], trainer["history"]
        loader.load_state_dict(trainer["loader"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer.get("fp8"):
            from megaflow.fp8 import load_fp8_state
            load_fp8_state(model, trainer["fp8"])
        if main_rank:
            log.info("resumed from %s at step %d", ckpt, start)

    # evaluation, sample grids and the report run on the split model (collective); nothing is gathered
    sampler = Sampling(cfg, tok, model, engine, topo, device)
    mon = eval_loader = None
    if main_rank:
        from megaflow.monitor import Monitor
        mon = Monitor(out, cfg, model, total=tcfg.steps, start=start, dp=topo.dp if topo else 1,
                      world=topo.world_size if topo else 1, data_stats=loader.stats)
    if tcfg.eval_data:  # every rank: evaluation is collective
        eval_loader = build_loader(dataclasses.replace(cfg.data, local=tcfg.eval_data, shuffle=False), tok, 0, 1)
    saver = None
    if topo is not None and tcfg.async_save:
        from parallel.checkpoint import AsyncSave
        saver = AsyncSave(topo)
    batches = _forever(loader)
    t_start = time.time()
    step = start
    metrics: dict = {}
    skipped = sum(1 for h in history if h.get("skipped"))  # over the whole run, resumes included
    any_rank = AnyRank(topo, cfg.parallel.timeout_s)  # step-boundary agreement: every rank stops at the same step
    idle, = any_rank(signals.received)  # signalled during start-up: stop before a step (the state is the checkpoint's)
    signalled = idle
    fp8_from = cfg.parallel.fp8_start_step if cfg.parallel.torch_fp8 else 0
    if fp8_from:  # parallel.fp8_start_step: bf16 GEMMs before it (the stages share the model's layers)
        from megaflow.fp8 import set_fp8_on
        set_fp8_on(model, start >= fp8_from)
    for step in range(start, start if idle else tcfg.steps):
        if fp8_from and step == fp8_from:
            set_fp8_on(model, True)
            log.info("parallel.fp8_start_step=%d: FP8 GEMMs on from step %d (bf16 before)", fp8_from, step + 1)
        host = next(batches)  # the monitor counts tokens on the host copy: no read-back of the device batch
        batch = to_device(host, device)
        noise, keep = step_randomness(cfg, model.cfg, batch, step, dp_rank, device)
        lr = lr_at(step, tcfg.lr, tcfg.min_lr, tcfg.warmup, tcfg.steps)
        metrics = engine.train_step(batch, noise, keep, lr)  # 0-d tensors: the GPU is not waited for
        history.append({"step": step + 1, "loss": metrics["loss"], "_skip": metrics.pop("skipped", False)})
        over_time = main_rank and bool(tcfg.max_minutes) and time.time() - t_start > 60 * tcfg.max_minutes
        signalled, over_time = any_rank(signals.received, over_time)  # over_time: where rank 0's clock says
        done = step + 1 == tcfg.steps or over_time or signalled  # a signal: save now, evaluate later
        evaluating = bool(tcfg.eval_data) and ((tcfg.eval_every and (step + 1) % tcfg.eval_every == 0)
                                               or (done and not signalled))
        saving = tcfg.save_every >= 0 and ((tcfg.save_every and (step + 1) % tcfg.save_every == 0) or done)
        sampling = bool(tcfg.sample_every) and (step + 1) % tcfg.sample_every == 0
        if (step + 1) % tcfg.log_every == 0 or done or evaluating or saving or sampling:
            metrics = read_metrics(metrics)  # the one read-back: log steps and before anything is written
            skipped = check_steps(settle_history(history), skipped, tcfg, out, main_rank)
            metrics["skipped_steps"] = skipped
        if mon is not None:
            mon.step(step + 1, host, metrics, lr)
        if evaluating:
            figures = evaluate(model, eval_loader, cfg, device, dtype, tcfg.eval_batches,
                               engine if topo is not None else None)  # collective: the split model
            if mon is not None:
                mon.eval(step + 1, figures)
        if saving:
            check_finite(engine, topo, device, step + 1, cfg, out)
            save(out, step + 1, cfg, model, engine, loader, history, tok, topo, saver)
        if sampling:
            from megaflow.quality import progress_grid
            grid = sampler.run(progress_grid, tok, cfg, step + 1)  # the ranks that take part, together
            if mon is not None and grid is not None:
                mon.image_grid("samples", grid, step + 1)
        if done:
            break
    if saver is not None:
        saver.finish()  # the last checkpoint is committed before the run reports
    result = {"steps": start if idle else step + 1, "train": metrics, "skipped_steps": skipped,
              "minutes": (time.time() - t_start) / 60}
    if signalled:
        result["stopped"] = stopped_by_signal(signals.received or "a signal to another rank", out, result["steps"],
                                              not idle, topo)
    if topo is not None:
        from parallel.checkpoint import layout_of
        result["parallel"] = layout_of(topo, cfg.parallel)
    if mon is not None and getattr(mon, "last_eval", None):
        result["eval"] = mon.last_eval
    stats = loader.stats  # this rank's reader: documents read, packed, skipped, dropped (must stay 0), slot fill
    result["data"] = {"dp_rank": dp_rank, **{k: stats[k] for k in ("batches", "samples", "docs", "dropped_docs", "skipped")},
                      "slot_fill": (stats["text_tokens"] + stats["image_slots"]) / max(stats["slots"], 1)}
    if tcfg.report and not signalled:
        from megaflow.quality import prepare_classifier, write_report
        if main_rank:
            prepare_classifier(cfg)  # trained and cached once, before the other ranks read it
        barrier(topo)
        report = sampler.run(write_report, tok, cfg, out, device, mon, write=main_rank)
        if main_rank:
            result["report"] = report
    if mon is not None:
        mon.close()
    loader.close()
    if eval_loader is not None:
        eval_loader.close()
    if main_rank:
        (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    return result  # no barrier: ranks that sit the report out return while the others write it


def stopped_by_signal(why: str, out: Path, step: int, progressed: bool, topo) -> str:
    """After a signalled stop (saved at `step`, when any step was made): its record in OUT_DIR/stops.json,
    and a CheckpointError on every rank after too many stops in a row without a step."""
    from megaflow.stop import MAX_IDLE_STOPS, idle_error, note_stop
    from parallel.runtime import broadcast_value
    idle = note_stop(out, step, progressed, why) if topo is None or topo.rank == 0 else 0
    idle = broadcast_value(idle, topo)
    if idle >= MAX_IDLE_STOPS:
        raise CheckpointError(idle_error(why, step, idle, out))
    log.warning("%s: stopped at step %d %s; a requeued or resubmitted run with --resume continues from there", why,
                step, "with a checkpoint" if progressed else "before a step (nothing new to save)")
    return why


class Sampling:
    """What sample grids and the report run on. One process: the model (under bf16 parameters an
    fp32 copy holding the main weights). Several: the model as training splits it, on the ranks
    that take part (parallel/sampling.py), never a whole-model copy on one rank."""

    def __init__(self, cfg: Config, tok, model, engine, topo, device):
        self.cfg, self.tok, self.model, self.engine, self.topo, self.device = cfg, tok, model, engine, topo, device
        self.copy = None
        if topo is not None:
            from parallel.sampling import sampling_model, sequence_parallel
            self.split = sampling_model(model, engine, topo)
            if (self.split is None and sequence_parallel(model) and topo.rank == 0
                    and (cfg.train.sample_every or cfg.train.report)):
                log.warning("parallel.sequence_parallel with layers whose sequence split cannot be switched off "
                            "for decoding (parallel.backend): no sample grids or quality report in this run; "
                            "judge a checkpoint with tools/eval_quality.py")

    def run(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs) on this rank, or None where this rank sits sampling out. Several
        processes: collective over the ranks that take part (every rank calls it at the same steps)."""
        if self.topo is not None:
            from parallel.sampling import sampling_scope
            if self.split is None:
                return None
            with sampling_scope(self.model, self.engine, self.topo):
                return fn(self.split, *args, **kwargs)
        return fn(self._one_process(), *args, **kwargs)

    def _one_process(self):
        if not getattr(getattr(self.engine, "weights", None), "mixed", False):
            return self.model
        if self.copy is None:  # bf16 parameters: evaluation and sampling read the fp32 main weights
            with torch.device("meta"):
                self.copy = STARFlow2(with_tokenizer(self.cfg.model, self.tok))
            self.copy.to_empty(device=self.device)
        load_model_state(self.copy, self.engine.model_state_dict(copy=False), strict=True)
        return self.copy


def settle_history(history: list) -> list:
    """Read back, at once, the losses and skip flags still held as device tensors (the steps since the
    last read, marked by `_skip`); returns those entries. A skipped step gets `"skipped": True`."""
    n = 0
    while n < len(history) and "_skip" in history[-1 - n]:
        n += 1
    pending = history[len(history) - n:]
    if pending:
        dev = next((v.device for h in pending for v in (h["loss"], h["_skip"]) if torch.is_tensor(v)), "cpu")
        values = torch.stack([torch.as_tensor(h[k], dtype=torch.float64, device=dev).detach()
                              for h in pending for k in ("loss", "_skip")]).tolist()
        for j, h in enumerate(pending):
            h["loss"] = values[2 * j]
            del h["_skip"]
            if values[2 * j + 1]:
                h["skipped"] = True
    return pending


def check_steps(settled: list, skipped: int, tcfg, out: Path, main_rank: bool) -> int:
    """The run's count of skipped steps after `settled` (history entries just read back): a skipped
    step (NaN/Inf gradients; the engine left weights and optimizer state untouched) is counted and
    logged, past train.max_skipped_steps the run stops; a non-finite loss that was not skipped stops it."""
    for h in settled:
        if h.get("skipped"):
            skipped += 1
            if main_rank:
                log.warning("step %d: NaN/Inf gradients (loss %s); the optimizer step was skipped (%d so far, "
                            "train.max_skipped_steps=%d)", h["step"], h["loss"], skipped, tcfg.max_skipped_steps)
            if skipped > tcfg.max_skipped_steps:
                raise FloatingPointError(f"{skipped} optimizer steps skipped for NaN/Inf gradients, the last at step "
                                         f"{h['step']} (train.max_skipped_steps={tcfg.max_skipped_steps}); lower "
                                         f"train.lr (now {tcfg.lr}) or check the data; the last good checkpoint is "
                                         f"in {str(out / 'checkpoints')!r}")
        elif not math.isfinite(h["loss"]):
            raise FloatingPointError(f"loss is {h['loss']} at step {h['step']}; lower train.lr (now {tcfg.lr}) "
                                     f"or check the data; the last good checkpoint is in {str(out / 'checkpoints')!r}")
    return skipped


def _forever(loader):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError(f"the training data at {loader.cfg.local!r} yields no batches; check its "
                               f"index.json and shards (python -m data_pipeline inspect {loader.cfg.local})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megaflow train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.steps=100 (see `megaflow info --help-config`)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in train.out_dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="start a fresh run in a train.out_dir that holds checkpoints: deletes OUT_DIR/checkpoints "
                         "(and nothing else) first")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))  # other ranks: warnings only
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config or str(DEFAULT_CONFIG), args.overrides)
        result = run(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, FileNotFoundError, TokenizerError, BadSampleError, FloatingPointError) as e:
        print(f"megaflow train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a vanished mount, permissions: the message names the file
        print(f"megaflow train: error: {e}; check the disk and permissions of that path", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "report"}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
