"""tools/reshard.py: a ZeRO checkpoint to one process, fp32 export, and the VLM out to Hugging Face.

Contract:
- A DP=2 ZeRO-1 run (2 gloo processes, tiny model, clipping and weight decay active) saved after 3
  steps and resharded with `--out` gives a single-process checkpoint whose optim.pt, loaded into
  the PlainEngine that `megaflow train` builds, holds exactly read_full_state's moments and step on
  the same parameters by name, and model.pt the fp32 masters; continuing it in one process gives
  the losses the ZeRO run itself got at steps 4 and 5 (1e-5): `--resume` in one process is exact.
- `inspect` reports the source's ZeRO layout (stage 1, dp 2, both shards present).
- `--export-fp32` writes a safetensors file that loads into the model and equals the masters.
- `--to-hf` of a Llama-like (untied, r=2) and a Qwen2-like (q/k/v bias, tied) VLM stream loads with
  transformers' AutoModelForCausalLM and gives the logits of our VLM stream within 1e-4.
- Wrong inputs exit 2 with a message: no such path, `--out` on a single-process checkpoint, a
  TarFlow-only model for --to-hf, and no action.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from data_pipeline.config import DataConfig
from megaflow.config import Config, TrainConfig, to_dict
from megaflow.model.starflow import build_model
from megaflow.optim import lr_at
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise, tiny_config
from tests.train.test_hf_parity import vlm_logits  # our VLM stream's text logits, as the HF import test reads them
from tools import reshard

REPO = Path(__file__).resolve().parents[2]
ROWS, SAVE_AT, STEPS = 4, 3, 5


@pytest.fixture(scope="module")
def deepspeed_ops():
    """DeepSpeed's CPU communication op compiled once, before the ranks import DeepSpeed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    from parallel.zero import import_deepspeed
    import_deepspeed("cpu").get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)


def run_config(zero_stage: int = 1) -> Config:
    return Config(model=dataclasses.replace(tiny_config(), stage="all"),
                  data=DataConfig(image_size=8, channels=1, patch_size=2),
                  train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup=2, steps=STEPS, grad_clip=1.0, weight_decay=0.1),
                  parallel=ParallelConfig(zero_stage=zero_stage))


def data(cfg: Config):
    batch = make_batch(cfg.model, ROWS, 48)
    return batch, make_noise(cfg.model, batch), torch.tensor([1.0, 0.0, 1.0, 1.0])


def lr(cfg: Config, step: int) -> float:
    t = cfg.train
    return lr_at(step, t.lr, t.min_lr, t.warmup, t.steps)


def write_meta(d: Path, step: int) -> None:
    """meta.json as megaflow.checkpoint.save_checkpoint writes it (files with sizes, last)."""
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    (d / "meta.json").write_text(json.dumps({"format": 1, "step": step, "files": files}))


def _zero_run(rank, world, ckpt):
    """DP=2 ZeRO-1: 3 steps, save a complete checkpoint (zero/, model.pt, optim.pt marker,
    config.json, meta.json), then steps 4-5; returns the losses of steps 4-5."""
    from parallel.tensor_parallel import build_tp_model
    from parallel.zero import ZeroEngine
    topo, cfg, ckpt = Topology(), run_config(), Path(ckpt)
    state = build_model(cfg.model, seed=0).state_dict()
    engine = ZeroEngine(build_tp_model(cfg.model, topo, cfg.parallel, state_dict=state), cfg, None, topo)
    batch, noise, keep = data(cfg)
    rows = slice(topo.dp_rank * ROWS // topo.dp, (topo.dp_rank + 1) * ROWS // topo.dp)
    local = {k: v[rows] for k, v in batch.items()}
    losses = []
    for step in range(STEPS):
        out = engine.train_step(local, noise[rows], keep[rows], lr(cfg, step))
        losses.append(out["loss"])
        if step + 1 == SAVE_AT:
            engine.save(ckpt)
            weights = engine.model_state_dict()
            if rank == 0:
                torch.save(weights, ckpt / "model.pt")
                torch.save(engine.state_dict(), ckpt / "optim.pt")
                (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
                write_meta(ckpt, SAVE_AT)
    return losses[SAVE_AT:]


def test_zero_to_single_process_continues_exactly(tmp_path, deepspeed_ops):
    from megaflow.checkpoint import load_file
    from megaflow.train import PlainEngine, load_model_state
    from parallel.zero_checkpoint import read_full_state
    src = tmp_path / "step_000003"
    src.mkdir()
    zero_losses = run_distributed(_zero_run, 2, str(src))[0]
    from tools.inspect_checkpoint import inspect
    info = inspect(str(src))
    assert info["zero"]["shards"] == 2 and (info["zero"]["dp"], info["zero"]["tp"], info["zero"]["pp"]) == (2, 1, 1)
    assert info["optimizer"]["kind"].startswith("ZeRO-1")

    assert reshard.main([str(src), "--out", str(tmp_path / "one"), "--export-fp32", str(tmp_path / "w.safetensors")]) == 0
    out = tmp_path / "one" / "checkpoints" / "step_000003"
    saved = json.loads((out / "config.json").read_text())
    assert saved["parallel"]["zero_stage"] == 0 and saved["train"]["out_dir"] == str(tmp_path / "one")
    assert json.loads((out / "meta.json").read_text())["source_layout"]["dp"] == 2

    cfg = run_config(zero_stage=0)
    model = build_model(cfg.model, seed=123)  # other weights: model.pt must overwrite them
    load_model_state(model, load_file(out, "model.pt"))
    engine = PlainEngine(model, cfg, None)
    engine.load_state_dict(load_file(out, "optim.pt"))
    full = read_full_state(src)
    step = full.pop("step")
    assert step == SAVE_AT
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(full), trainable ^ set(full)
    for name, p in model.named_parameters():
        st = engine.optimizer.state[p]
        assert int(st["step"]) == SAVE_AT, name
        assert torch.equal(p.detach(), full[name]["fp32"]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], full[name][k]), (name, k)

    from safetensors.torch import load_file as load_safetensors
    exported = load_safetensors(str(tmp_path / "w.safetensors"))
    assert set(exported) == set(model.state_dict())
    assert all(torch.equal(exported[n], full[n]["fp32"]) for n in full)

    batch, noise, keep = data(cfg)
    again = [engine.train_step(batch, noise, keep, lr(cfg, s))["loss"] for s in range(SAVE_AT, STEPS)]
    assert max(abs(a - b) for a, b in zip(again, zero_losses)) < 1e-5, (again, zero_losses)

    # the old format is refused by training with the conversion command; --to-sharded converts it
    from megaflow.checkpoint import CheckpointError
    from parallel.checkpoint import load_engine_state
    fresh = PlainEngine(build_model(cfg.model, seed=7), cfg, None)
    (src / "meta.json").write_text(json.dumps({**json.loads((src / "meta.json").read_text()),
                                               "parallel": {"dp": 2, "zero_stage": 1}}))
    with pytest.raises(CheckpointError, match="--to-sharded"):
        load_engine_state(fresh, src)
    assert reshard.main([str(src), "--to-sharded", str(tmp_path / "sharded")]) == 0
    sharded = tmp_path / "sharded" / "checkpoints" / "step_000003"
    assert load_engine_state(fresh, sharded) == SAVE_AT
    for name, p in fresh.model.named_parameters():
        st = fresh.optimizer.state[p]
        assert torch.equal(p.detach(), full[name]["fp32"]) and int(st["step"]) == SAVE_AT, name
        assert all(torch.equal(st[k], full[name][k]) for k in ("exp_avg", "exp_avg_sq")), name
    again = [fresh.train_step(batch, noise, keep, lr(cfg, s))["loss"] for s in range(SAVE_AT, STEPS)]
    assert max(abs(a - b) for a, b in zip(again, zero_losses)) < 1e-5, (again, zero_losses)


def plain_checkpoint(d: Path, cfg: Config, model) -> Path:
    d.mkdir(parents=True)
    torch.save(model.state_dict(), d / "model.pt")
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    write_meta(d, 7)
    return d


@pytest.mark.parametrize("kind", ["llama-untied", "qwen2-tied"])
def test_to_hf_logits_match(tmp_path, kind):
    from transformers import AutoModelForCausalLM
    m = tiny_config()
    if kind == "qwen2-tied":
        m = dataclasses.replace(m, vlm=dataclasses.replace(m.vlm, qkv_bias=True, tie_embeddings=True))
    cfg = Config(model=m, data=DataConfig(image_size=8, channels=1, patch_size=2))
    model = build_model(m, seed=0)
    with torch.no_grad():  # every tensor non-trivial, so a mis-mapped one cannot hide behind 0 or 1
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    src = plain_checkpoint(tmp_path / "ckpt", cfg, model)
    assert reshard.main([str(src), "--to-hf", str(tmp_path / "hf")]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == kind.split("-")[0] and hf_cfg["tie_word_embeddings"] == (kind == "qwen2-tied")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, m.vlm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ours = hf(tokens).logits, vlm_logits(model, tokens)
    assert ref.std() > 0.5, "logits too flat for the comparison to mean anything"
    diff = float((ours - ref).abs().max())
    assert diff <= 1e-4, f"{kind}: max |logit diff| {diff:.2e}"


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert reshard.main([str(tmp_path / "nope"), "--to-hf", str(tmp_path / "hf")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    cfg = run_config(zero_stage=0)
    src = plain_checkpoint(tmp_path / "plain", cfg, build_model(cfg.model))
    assert reshard.main([str(src), "--out", str(tmp_path / "o")]) == 2
    assert "a single-process checkpoint already" in capsys.readouterr().err
    tar = dataclasses.replace(cfg, model=dataclasses.replace(tiny_config(tarflow_only=True), stage="all"))
    src = plain_checkpoint(tmp_path / "tar", tar, build_model(tar.model))
    assert reshard.main([str(src), "--to-hf", str(tmp_path / "hf")]) == 2
    assert "TarFlow-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reshard.main([str(src)])
    assert "nothing to do" in capsys.readouterr().err
