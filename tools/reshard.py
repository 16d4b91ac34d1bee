"""Convert a checkpoint: to a single process, to the sharded format, to fp32 weights, or a Hugging Face LM.

    python tools/reshard.py runs/big/checkpoints/step_001000 --out runs/big_1gpu        # (a)
    python tools/reshard.py runs/old --to-sharded runs/old_sharded                       # (d)
    python tools/reshard.py runs/big --export-fp32 big_fp32.safetensors                  # (b)
    python tools/reshard.py runs/big --to-hf hf_lm/ [--hf-dtype bf16]                    # (c)
    megaflow reshard ...                                                                  # the same

The source is a checkpoint directory, or a run directory (its newest complete checkpoint), in one
of three formats:
  - sharded (multi-process runs, parallel/checkpoint.py): state/ written by torch.distributed.
    checkpoint, every tensor (weights = fp32 masters under ZeRO, AdamW moments) under its
    one-process name with its global shape, in per-rank pieces. `megaflow train --resume` loads it
    at ANY layout (and in one process) by itself: no conversion is needed to change layout; this
    tool reads it whole (one process) for (a), (b), (c);
  - one process: model.pt + optim.pt (PlainEngine). Also loads at any layout by itself;
  - the old multi-process format (before sharded saves): a gathered model.pt with zero/
    (parallel/zero_checkpoint.py, read by `read_full_state`) or optim.ppPP_tpTT.pt per pipeline
    coordinate (tp == 1 only). Training refuses it; (a) or (d) convert it.

(a) `--out DIR` writes DIR/checkpoints/step_XXXXXX, a single-process checkpoint: model.pt with the
    fp32 (master) weights, optim.pt in the PlainEngine's format (torch AdamW state on the parameter
    order and groups `megaflow.optim.param_groups` gives the one-process model), config.json with the
    parallel section reset to one process, and the source's other files (trainer.pt: step, data
    position, history; tokenizer.*) copied. `megaflow train --config X --set train.out_dir=DIR
    --resume` continues it in one process.
(d) `--to-sharded DIR`: the same content as (a) written in the sharded format (state/, from this one
    process), so a one-process or old-format checkpoint resumes at any layout with its optimizer
    state (`megaflow train --set train.out_dir=DIR --resume` under torchrun).
(b) `--export-fp32 FILE` (.safetensors or .pt): every weight in fp32, trainable ones from the fp32
    master weights when the checkpoint has them. Loads with `model.load_state_dict`.
(c) `--to-hf DIR`: the VLM stream as a transformers Llama (Qwen2 when vlm.qkv_bias) directory:
    config.json + model.safetensors (+ the tokenizer files when the run used a Hugging Face
    tokenizer). On text the exported LM computes exactly what our VLM stream does; on image slots
    ours also reads the flow stream (Pretzel skip W_d), which the export leaves out.

What it does not do: join the old format's ParallelEngine TP-sharded AdamW files (tp > 1 without
ZeRO: they carry no names or shard dims).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.checkpoint import CheckpointError, load_file, resolve, save_checkpoint, validate  # noqa: E402
from megaflow.config import Config, saved_config_from_dict, to_dict  # noqa: E402
from megaflow.model.config import ModelConfig  # noqa: E402
from megaflow.model.layers import fuse_legacy  # noqa: E402

# Files of a checkpoint that the single-process output rewrites; everything else is copied.
REWRITTEN = ("model.pt", "optim.pt", "config.json", "meta.json")


def is_sharded(ckpt: Path) -> bool:
    from parallel.checkpoint import is_sharded as sharded
    return sharded(ckpt)


def weights_of(ckpt: Path) -> dict:
    """The checkpoint's weights {name: whole tensor}, whatever its format (one process: model.pt),
    under the fused model's names (also when written before the fused projections)."""
    if is_sharded(ckpt):
        from parallel.checkpoint import read_sharded
        return read_sharded(ckpt, weights_only=True)[0]
    return fuse_legacy(load_file(ckpt, "model.pt"))


# ----- reading a checkpoint --------------------------------------------------------------------
def read_config(ckpt: Path) -> Config:
    f = ckpt / "config.json"
    if not f.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no config.json; it was not written by megaflow train")
    return saved_config_from_dict(json.loads(f.read_text()))


def model_config(ckpt: Path, cfg: Config, state: dict) -> ModelConfig:
    """The model config the checkpoint's weights were built with. config.json holds the run's config
    from before `megaflow.train.with_tokenizer`; the vocabulary is read off the weights and the
    special ids from the saved tokenizer's description, so no tokenizer has to be loaded."""
    m = cfg.model
    tok_file = ckpt / "tokenizer.megaflow_tokenizer.json"
    if tok_file.is_file():
        ids = {k: v for k, v in json.loads(tok_file.read_text()).items() if k in vars(m.tokens)}
        m = dataclasses.replace(m, tokens=dataclasses.replace(m.tokens, **ids))
    if m.vlm is not None and "embed_tokens.weight" in state:
        m = dataclasses.replace(m, vlm=dataclasses.replace(m.vlm, vocab_size=state["embed_tokens.weight"].shape[0]))
    elif m.vlm is None and "flow_embed.weight" in state:
        m = dataclasses.replace(m, flow=dataclasses.replace(m.flow, n_cond_tokens=state["flow_embed.weight"].shape[0]))
    return m


def meta_model(mcfg: ModelConfig):
    """The one-process STARFlow2 on the meta device, with its curriculum stage's requires_grad."""
    from megaflow.model.starflow import STARFlow2, apply_stage
    with torch.device("meta"):
        model = STARFlow2(mcfg)
    apply_stage(model, mcfg.stage)
    return model


def has_zero(ckpt: Path) -> bool:
    return (ckpt / "zero").is_dir() and any((ckpt / "zero").glob("pp*_tp*_dp*.pt"))


def zero_layout(ckpt: Path) -> dict:
    f = ckpt / "zero" / "layout.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def fp32_state(ckpt: Path, zero_state: dict | None = None, state: dict | None = None) -> dict:
    """model.pt (`state` if already loaded) with every floating tensor in fp32; trainable ones replaced
    by ZeRO's fp32 masters when given (a bf16 ZeRO run's model.pt may hold rounded weights)."""
    state = weights_of(ckpt) if state is None else state
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    for name, entry in (zero_state or {}).items():
        if name == "step":
            continue
        if name not in out:
            raise CheckpointError(f"the ZeRO state of {str(ckpt)!r} has {name!r}, which model.pt lacks; "
                                  f"zero/ and model.pt come from different runs")
        if tuple(out[name].shape) != tuple(entry["fp32"].shape):
            raise CheckpointError(f"{name!r}: ZeRO master shape {tuple(entry['fp32'].shape)} but model.pt has "
                                  f"{tuple(out[name].shape)}")
        out[name] = entry["fp32"].float()
    return out


# ----- (a) single-process checkpoint ------------------------------------------------------------
def single_process_optimizer(model, cfg: Config, opt_state: dict) -> dict:
    """optim.pt of the one-process PlainEngine: its own AdamW (built by megaflow.optim on the meta
    model, so the parameter order and groups are the ones `megaflow train` builds) with the saved
    moments and step (`opt_state`: {name: {'exp_avg', 'exp_avg_sq', ...}, 'step'}) filled in by name."""
    from megaflow.train import PlainEngine
    names = {id(p): n for n, p in model.named_parameters()}
    engine = PlainEngine(model, cfg, None)
    trainable = [p for g in engine.optimizer.param_groups for p in g["params"]]
    want = {names[id(p)] for p in trainable}
    have = set(opt_state) - {"step"}
    missing = sorted(want - have)
    if missing:
        raise CheckpointError(f"the checkpoint's optimizer state has no entry for {len(missing)} parameters that train "
                              f"in stage {model.cfg.stage!r}, e.g. {missing[:3]}: it was written for another "
                              f"curriculum stage or model")
    extra = sorted(have - want - ({"lm_head.weight"} if model.cfg.vlm and model.cfg.vlm.tie_embeddings else set()))
    if extra:  # (the last pipeline stage's copy of a tied embedding is the only expected extra)
        raise CheckpointError(f"the checkpoint's optimizer state has {len(extra)} parameters that do not train in "
                              f"stage {model.cfg.stage!r} of this config, e.g. {extra[:3]}")
    step = torch.tensor(float(opt_state["step"]))
    for p in trainable:
        entry = opt_state[names[id(p)]]
        if tuple(entry["exp_avg"].shape) != tuple(p.shape):
            raise CheckpointError(f"{names[id(p)]!r}: saved moment shape {tuple(entry['exp_avg'].shape)} but the "
                                  f"model has {tuple(p.shape)}")
        engine.optimizer.state[p] = {"step": step.clone(), "exp_avg": entry["exp_avg"].float().clone(),
                                     "exp_avg_sq": entry["exp_avg_sq"].float().clone()}
    return engine.state_dict()


def parallel_engine_state(src: Path, cfg: Config, mcfg: ModelConfig, layout: dict) -> dict:
    """{name: {'exp_avg', 'exp_avg_sq'}, 'step': int} from a ParallelEngine checkpoint (no ZeRO): one
    torch AdamW state per pipeline coordinate, `optim.ppPP_tp00.pt`, whose entries are numbered in
    the order `megaflow.optim.param_groups` gives that rank's stages. The stages are cut again here
    from the meta model exactly as parallel/runtime.py cuts them, which names every entry. Only
    tp == 1: TP shards carry no names or shard dims in these files."""
    import torch.nn as nn

    from megaflow.optim import param_groups
    from parallel.pipeline import split_stages
    if layout.get("tp", 1) > 1:
        raise CheckpointError(f"{str(src)!r} was written by the ParallelEngine with tp={layout['tp']} (no ZeRO): its "
                              f"per-rank AdamW files hold TP shards without names, which this tool does not join. "
                              f"Resume it with the same tp and pp, or train with parallel.zero_stage=1, whose "
                              f"optimizer state reshards to any layout")
    p, out, step = cfg.parallel, {}, 0
    for pp_rank in range(layout.get("pp", 1)):
        blob = load_file(src, f"optim.pp{pp_rank:02d}_tp00.pt")
        model = meta_model(mcfg)
        names = {id(t): n for n, t in model.named_parameters()}
        stages = split_stages(model, layout.get("pp", 1), pp_rank, p.schedule, p.virtual_stages, p.micro_batches,
                              p.stage_layout, cfg.data.seq_len, verbose=False)
        groups = param_groups(nn.ModuleList([st.module for st in stages]), cfg.train.weight_decay)
        order = [t for g in groups for t in g["params"]]
        saved = blob["optimizer"]["state"]
        if len(order) != blob.get("n_params", len(order)) or set(saved) - set(range(len(order))):
            raise CheckpointError(f"{str(src)!r}: optim.pp{pp_rank:02d}_tp00.pt has {blob.get('n_params')} parameters but "
                                  f"pipeline rank {pp_rank} of its config.json has {len(order)}: written for another "
                                  f"stage layout or model")
        for i, t in enumerate(order):
            if i not in saved:
                raise CheckpointError(f"{str(src)!r}: no AdamW state for {names[id(t)]!r} (never stepped?)")
            entry = saved[i]
            # A tied embedding's last-stage copy names the embedding too; both copies hold one state.
            out.setdefault(names[id(t)], {"exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"]})
            step = max(step, int(entry["step"]))
    out["step"] = step
    return out


def sharded_optimizer_state(src: Path, cfg: Config, mcfg: ModelConfig) -> tuple:
    """(optimizer state by name, the source layout) of a ZeRO or ParallelEngine checkpoint."""
    from parallel.zero_checkpoint import read_full_state
    if is_sharded(src):
        from parallel.checkpoint import read_sharded
        return read_sharded(src)[1], validate(src).get("parallel", {})
    if has_zero(src):
        return read_full_state(src), zero_layout(src)
    marker = load_file(src, "optim.pt") if (src / "optim.pt").is_file() else {}
    if marker.get("engine") == "parallel":
        return parallel_engine_state(src, cfg, mcfg, marker.get("layout", {})), marker.get("layout", {})
    raise CheckpointError(f"{str(src)!r} has neither ZeRO optimizer shards (zero/) nor ParallelEngine files "
                          f"(optim.pp*_tp*.pt): it is a single-process checkpoint already, so --out has nothing to "
                          f"convert; --export-fp32 and --to-hf work on it")


def one_process_content(src: Path) -> tuple:
    """(meta, config for one process, model config, fp32 weights, optim.pt content, layout) of a
    multi-process checkpoint (sharded, or the old format: ZeRO of any layout, ParallelEngine tp == 1)."""
    from parallel.topology import ParallelConfig
    meta = validate(src)
    cfg = read_config(src)
    if is_sharded(src):
        from parallel.checkpoint import read_sharded
        weights, opt_state = read_sharded(src)
        layout = meta.get("parallel", {})
        mcfg = model_config(src, cfg, weights)
    else:
        weights = weights_of(src)
        mcfg = model_config(src, cfg, weights)
        opt_state, layout = sharded_optimizer_state(src, cfg, mcfg)
    state = fp32_state(src, opt_state if has_zero(src) and not is_sharded(src) else None, weights)
    model = meta_model(mcfg)
    one = dataclasses.replace(cfg, parallel=ParallelConfig())
    optim = single_process_optimizer(model, one, opt_state)
    if mcfg.vlm is not None and mcfg.vlm.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # one tensor, as the model holds it
    own = set(model.state_dict())
    if set(state) != own:
        raise CheckpointError(f"the weights of {str(src)!r} do not match its config.json's model: missing "
                              f"{sorted(own - set(state))[:3]}, unexpected {sorted(set(state) - set(own))[:3]}")
    return meta, one, mcfg, state, optim, opt_state, layout


def write_single_process(src: Path, out: Path) -> Path:
    """(a): OUT/checkpoints/step_XXXXXX from a multi-process checkpoint (see one_process_content)."""
    meta, one, mcfg, state, optim, opt_state, layout = one_process_content(src)
    one = dataclasses.replace(one, train=dataclasses.replace(one.train, out_dir=str(out)))

    def write(d: Path):
        torch.save(state, d / "model.pt")
        torch.save(optim, d / "optim.pt")
        (d / "config.json").write_text(json.dumps(to_dict(one), indent=1))
        copy_rest(src, d)

    extra = {"resharded_from": str(src.resolve()),
             "source_layout": {k: layout.get(k) for k in ("zero_stage", "tp", "pp", "dp")}}
    # keep_last=0 keeps every checkpoint already in OUT
    return save_checkpoint(out / "checkpoints", int(meta.get("step", opt_state["step"])), write, keep_last=0,
                           extra_meta=extra)


def copy_rest(src: Path, d: Path) -> None:
    """trainer.pt, tokenizer.*: not model.pt, optimizer files, zero/ or state/."""
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in REWRITTEN and not f.name.startswith("optim."):
            shutil.copyfile(f, d / f.name)


# ----- (d) sharded format ---------------------------------------------------------------------------
def write_sharded(src: Path, out: Path) -> Path:
    """(d): OUT/checkpoints/step_XXXXXX in the sharded format (parallel/checkpoint.py), written by
    this one process, from a one-process or old-format multi-process checkpoint."""
    from parallel.checkpoint import FORMAT, STATE
    from parallel.checkpoint_state import STEP, model_key, optim_key
    from parallel.dcp_boxes import Boxes, save_boxes
    meta = validate(src)
    if is_sharded(src):
        raise CheckpointError(f"{str(src)!r} is sharded already: it loads at any layout as it is")
    marker = load_file(src, "optim.pt") if (src / "optim.pt").is_file() else {}
    if meta.get("parallel") or has_zero(src) or "engine" in marker or marker.get("sharded"):
        meta, cfg, mcfg, weights, _, opt_state, layout = one_process_content(src)
    else:  # one process: model.pt + optim.pt, named by the one-process parameter order
        cfg = read_config(src)
        weights = weights_of(src)
        mcfg = model_config(src, cfg, weights)
        opt_state, layout = one_process_optimizer_state(src, cfg, mcfg), {}
    state = {model_key(k): Boxes(v.shape, [([0] * v.dim(), v)]) for k, v in weights.items()}
    for name, entry in opt_state.items():
        if name != "step":
            state.update({optim_key(name, k): Boxes(entry[k].shape, [([0] * entry[k].dim(), entry[k])])
                          for k in ("exp_avg", "exp_avg_sq")})
    state[STEP] = int(opt_state.get("step", 0))
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out)))

    def write(d: Path):
        save_boxes(state, d / STATE)
        (d / "config.json").write_text(json.dumps(to_dict(one), indent=1))
        copy_rest(src, d)
    extra = {"resharded_from": str(src.resolve()), "sharded": FORMAT,
             "parallel": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "converted_from": layout}}
    return save_checkpoint(out / "checkpoints", int(meta.get("step", state[STEP])), write, keep_last=0,
                           extra_meta=extra)


def one_process_optimizer_state(src: Path, cfg: Config, mcfg: ModelConfig) -> dict:
    """{name: {'exp_avg', 'exp_avg_sq'}, 'step'} of a one-process optim.pt: its entries are numbered
    in the order megaflow.optim.param_groups gives the one-process model (or, from before the fused
    projections, that order with q/k/v and gate/up separate: fused here)."""
    from megaflow.optim import fuse_legacy_optimizer, group_names, param_groups
    model = meta_model(mcfg)
    names = group_names(model, param_groups(model, cfg.train.weight_decay))
    order = [n for group in names for n in group]
    saved = fuse_legacy_optimizer(load_file(src, "optim.pt")["optimizer"], names)["state"]
    out = {"step": 0}
    for i, name in enumerate(order):
        if i in saved:
            out[name] = {k: saved[i][k] for k in ("exp_avg", "exp_avg_sq")}
            out["step"] = int(saved[i]["step"])
    return out


# ----- (b) fp32 weights ----------------------------------------------------------------------------
def export_fp32(src: Path, path: Path) -> Path:
    from parallel.zero_checkpoint import read_full_state
    validate(src)
    state = fp32_state(src, read_full_state(src) if has_zero(src) else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        # safetensors refuses tensors that share memory (a tied head): store each on its own
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    elif path.suffix in (".pt", ".pth", ".bin"):
        torch.save(state, path)
    else:
        raise ValueError(f"--export-fp32 {str(path)!r}: the file name must end in .safetensors or .pt")
    return path


# ----- (c) Hugging Face LM -------------------------------------------------------------------------
def hf_config(mcfg: ModelConfig, max_positions: int, dtype: torch.dtype):
    """transformers config of the VLM stream: Llama, or Qwen2 when it has q/k/v biases."""
    v = mcfg.vlm
    kw = dict(vocab_size=v.vocab_size, hidden_size=v.dim, intermediate_size=v.ffn_dim, num_hidden_layers=v.n_layers,
              num_attention_heads=v.n_heads, num_key_value_heads=v.n_kv_heads, head_dim=v.hd,
              rms_norm_eps=v.norm_eps, rope_theta=v.rope_theta, tie_word_embeddings=v.tie_embeddings,
              max_position_embeddings=max_positions, hidden_act="silu", bos_token_id=mcfg.tokens.bos_id,
              eos_token_id=mcfg.tokens.eos_id, pad_token_id=mcfg.tokens.pad_id,
              torch_dtype=str(dtype).removeprefix("torch."))
    if v.qkv_bias:
        from transformers import Qwen2Config
        return Qwen2Config(use_sliding_window=False, **kw)
    from transformers import LlamaConfig
    return LlamaConfig(attention_bias=False, mlp_bias=False, **kw)


def export_hf(src: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    from megaflow.hf_import import megaflow_to_hf_name, split_fused
    from parallel.zero_checkpoint import read_full_state
    validate(src)
    cfg = read_config(src)
    state = fp32_state(src, read_full_state(src) if has_zero(src) else None)
    mcfg = model_config(src, cfg, state)
    if mcfg.vlm is None:
        raise ValueError(f"{str(src)!r} is a TarFlow-only model (model.vlm is None): it has no language model to export")
    r = mcfg.flow.ratio
    weights = {}
    for name, t in split_fused(state, mcfg.vlm).items():  # our fused qkv / gate_up as HF's q/k/v, gate/up
        if mcfg.vlm.tie_embeddings and name == "lm_head.weight":
            continue  # HF ties it to model.embed_tokens.weight from tie_word_embeddings
        try:
            hf_name = megaflow_to_hf_name(name, r)
        except ValueError:
            continue  # flow stream, adapter, FAE, couplings: not part of the LM
        weights[hf_name] = t.to(dtype).contiguous().clone()
    n_want = 2 + (not mcfg.vlm.tie_embeddings) + mcfg.vlm.n_layers * (9 + 3 * mcfg.vlm.qkv_bias)
    if len(weights) != n_want:
        raise CheckpointError(f"found {len(weights)} VLM tensors in {str(src)!r}, a {mcfg.vlm.n_layers}-layer "
                              f"{'Qwen2' if mcfg.vlm.qkv_bias else 'Llama'} needs {n_want}")
    out.mkdir(parents=True, exist_ok=True)
    hf_config(mcfg, max(cfg.data.seq_len, mcfg.max_seq_len), dtype).save_pretrained(out)
    from safetensors.torch import save_file
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok_meta = src / "tokenizer.megaflow_tokenizer.json"
    is_hf_tok = (src / "tokenizer.tokenizer.json").is_file() or (
        tok_meta.is_file() and json.loads(tok_meta.read_text()).get("kind") == "hf")
    if is_hf_tok:  # un-flatten train.save's tokenizer.<name> files
        for f in src.glob("tokenizer.*"):
            shutil.copyfile(f, out / f.name[len("tokenizer."):])
    return out


# ----- command line ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megaflow reshard", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint directory (step_XXXXXX) or a run's out_dir")
    ap.add_argument("--out", help="write a single-process checkpoint under OUT/checkpoints/ (ZeRO or tp=1 sources)")
    ap.add_argument("--to-sharded", metavar="DIR", help="write the sharded format under DIR/checkpoints/ (loads at any "
                    "layout); from a one-process or old-format checkpoint")
    ap.add_argument("--export-fp32", metavar="FILE", help="write fp32 weights to FILE (.safetensors or .pt)")
    ap.add_argument("--to-hf", metavar="DIR", help="write the VLM stream as a Hugging Face Llama/Qwen2 directory")
    ap.add_argument("--hf-dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of --to-hf's weights")
    args = ap.parse_args(argv)
    if not (args.out or args.to_sharded or args.export_fp32 or args.to_hf):
        ap.error("nothing to do: give --out, --to-sharded, --export-fp32 and/or --to-hf")
    try:
        src = resolve(args.checkpoint)
        if args.out:
            print(f"single-process checkpoint: {write_single_process(src, Path(args.out))}")
        if args.to_sharded:
            print(f"sharded checkpoint: {write_sharded(src, Path(args.to_sharded))}")
        if args.export_fp32:
            print(f"fp32 weights: {export_fp32(src, Path(args.export_fp32))}")
        if args.to_hf:
            dtype = torch.bfloat16 if args.hf_dtype == "bf16" else torch.float32
            print(f"Hugging Face LM: {export_hf(src, Path(args.to_hf), dtype)}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"megaflow reshard: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
