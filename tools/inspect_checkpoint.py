"""Show what a checkpoint holds, and check that it is complete and consistent.

    python tools/inspect_checkpoint.py runs/tiny                      # newest complete checkpoint of a run
    python tools/inspect_checkpoint.py runs/tiny/checkpoints/step_000060 --tensors
    megaflow inspect runs/tiny --json                                  # the same, machine-readable

Prints meta.json (format, step, files), a summary of config.json (model, data, train, parallel),
the trainer's step and last loss, parameter counts per part (megaflow.cli.count_parameters) and
how many train in the checkpoint's curriculum stage, the optimizer state (plain AdamW; a sharded
checkpoint's layout, per-rank files and AdamW step; or the old format's ZeRO marker and layout),
the old format's ZeRO layout when zero/ is present, and with --tensors every weight with its
shape and dtype. Checks, each a non-zero exit with a message: the checkpoint validates
(megaflow.checkpoint.validate: meta.json present, every file there with its recorded size),
model.pt / optim.pt / trainer.pt load, the weights' names and shapes match the model config.json
describes, and every per-rank file a sharded checkpoint's metadata names (or every ZeRO shard /
per-coordinate optimizer file of the old format) is present. A sharded checkpoint (state/) is
read from its DCP metadata only, no tensor data. It reads only: nothing is repaired or written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.checkpoint import CheckpointError, load_file, resolve, validate  # noqa: E402
from tools.reshard import meta_model, model_config, read_config, zero_layout  # noqa: E402


def load_model_pt(ckpt: Path) -> dict:
    """model.pt memory-mapped (tensors are read only when touched: cheap for a large checkpoint)."""
    try:
        return torch.load(ckpt / "model.pt", map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt zip files
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: cannot read model.pt: {e}") from e


def sharded_shapes(ckpt: Path) -> dict:
    """{name: meta tensor of the saved global shape and dtype} of a sharded checkpoint's weights,
    from the DCP metadata alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        md = FileSystemReader(str(ckpt / "state")).read_metadata()
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: cannot read state/.metadata: {e}") from e
    return {k[len("model/"):]: torch.empty(v.size, dtype=v.properties.dtype, device="meta")
            for k, v in md.state_dict_metadata.items()
            if k.startswith("model/") and isinstance(v, TensorStorageMetadata)}


def sharded_summary(ckpt: Path, meta: dict) -> dict:
    """Layout, per-rank files (all present) and AdamW step of a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from parallel.dcp_boxes import read_full
    d = ckpt / "state"
    md = FileSystemReader(str(d)).read_metadata()
    files = sorted({info.relative_path for info in md.storage_data.values()})
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {len(missing)} of {len(files)} per-rank files are missing "
                              f"(e.g. state/{missing[0]}); it cannot be loaded")
    moments = [k for k in md.state_dict_metadata if k.startswith("optim/") and k.endswith("/exp_avg")]
    step = read_full(d, ["optim/step"])["optim/step"] if "optim/step" in md.state_dict_metadata else None
    return {"kind": "sharded (torch.distributed.checkpoint, loads at any layout)", **(meta.get("parallel") or {}),
            "files": len(files), "bytes": sum((d / f).stat().st_size for f in files),
            "params_with_state": len(moments), "adam_step": step}


def check_model(ckpt: Path, state: dict, model) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: model.pt does not match the model of its config.json: "
                              f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    for name, t in own.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: model.pt's {name!r} has shape {tuple(state[name].shape)}, "
                                  f"config.json's model has {tuple(t.shape)}")


def optimizer_summary(ckpt: Path) -> dict:
    if not (ckpt / "optim.pt").is_file():
        return {"kind": "none"}
    optim = load_file(ckpt, "optim.pt")
    if "engine" in optim:  # a multi-process run's marker (parallel/checkpoint.py); the state is elsewhere
        layout = optim.get("layout") or {}
        out = {"kind": f"{optim['engine']} engine (multi-process)", **layout}
        if optim["engine"] == "parallel":
            want = [f"optim.pp{p:02d}_tp{t:02d}.pt" for p in range(layout.get("pp", 1)) for t in range(layout.get("tp", 1))]
            missing = [f for f in want if not (ckpt / f).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {str(ckpt)!r}: {len(missing)} of {len(want)} optimizer files are "
                                      f"missing (e.g. {missing[0]}); it cannot be resumed")
            out["files"] = len(want)
        return out
    if optim.get("sharded"):
        return {"kind": f"ZeRO-{optim.get('zero_stage')} (sharded: zero/)"}
    inner = optim.get("optimizer", optim)
    state = inner.get("state", {})
    steps = {int(s["step"]) for s in state.values() if "step" in s}
    return {"kind": "AdamW", "params_with_state": len(state), "groups": len(inner.get("param_groups", [])),
            "adam_step": sorted(steps)[-1] if steps else 0}


def zero_summary(ckpt: Path) -> dict | None:
    d = ckpt / "zero"
    if not d.is_dir():
        return None
    layout = zero_layout(ckpt)
    if not layout:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: zero/ has no layout.json; the ZeRO save was interrupted")
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    want = [f"pp{p:02d}_tp{t:02d}_dp{r:03d}.pt" for p in range(pp) for t in range(tp) for r in range(dp)]
    missing = [f for f in want if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {str(ckpt)!r}: {len(missing)} of {len(want)} ZeRO shards are missing "
                              f"(e.g. zero/{missing[0]}); it cannot be resumed or resharded")
    return {"zero_stage": layout.get("zero_stage"), "tp": tp, "pp": pp, "dp": dp, "shards": len(want),
            "bytes": sum((d / f).stat().st_size for f in want)}


def inspect(path: str, tensors: bool = False) -> dict:
    """Everything the tool prints, as a dict; raises CheckpointError on a bad checkpoint."""
    from megaflow.cli import count_parameters
    ckpt = resolve(path)
    meta = validate(ckpt)
    cfg = read_config(ckpt)
    sharded = (ckpt / "state" / ".metadata").is_file()
    state = sharded_shapes(ckpt) if sharded else load_model_pt(ckpt)
    mcfg = model_config(ckpt, cfg, state)
    model = meta_model(mcfg)
    check_model(ckpt, state, model)
    info = {"checkpoint": str(ckpt), "meta": meta}
    if (ckpt / "trainer.pt").is_file():
        trainer = load_file(ckpt, "trainer.pt")
        hist = trainer.get("history") or [{}]
        info["trainer"] = {"step": trainer.get("step"), "last_loss": hist[-1].get("loss")}
    v, f, d, t, p = mcfg.vlm, mcfg.flow, cfg.data, cfg.train, cfg.parallel
    info["config"] = {
        "stage": mcfg.stage,
        "vlm": None if v is None else f"dim {v.dim}, {v.n_layers} layers, {v.n_heads}/{v.n_kv_heads} heads, "
                                      f"ffn {v.ffn_dim}, vocab {v.vocab_size}, tied {v.tie_embeddings}",
        "flow": f"dim {f.dim}, {f.n_layers} layers (ratio {f.ratio}), {f.n_shallow} shallow x {f.shallow_layers}",
        "fae": f"{mcfg.fae.mode}, {mcfg.fae.image_size}px x {mcfg.fae.channels}, patch {mcfg.fae.patch_size}",
        "data": f"{d.local}, seq_len {d.seq_len}, batch {d.batch_size}",
        "train": f"steps {t.steps}, lr {t.lr}, out_dir {t.out_dir}",
        "parallel": f"tp {p.tp}, pp {p.pp}, zero_stage {p.zero_stage}, micro_batches {p.micro_batches}",
    }
    info["parameters"] = dict(count_parameters(model))
    info["parameters"]["trainable in this stage"] = sum(x.numel() for x in model.parameters() if x.requires_grad)
    info["optimizer"] = sharded_summary(ckpt, meta) if sharded else optimizer_summary(ckpt)
    info["zero"] = zero_summary(ckpt)
    if tensors:
        info["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                           for k, v in state.items()}
    return info


def render(info: dict) -> str:
    meta = info["meta"]
    lines = [f"checkpoint: {info['checkpoint']}",
             f"  format {meta.get('format')}, step {meta.get('step')}, "
             f"{sum(meta.get('files', {}).values()) / 2**20:.2f} MiB in {len(meta.get('files', {}))} files: "
             + ", ".join(meta.get("files", {}))]
    if "trainer" in info:
        lines.append(f"  trainer: step {info['trainer']['step']}, last loss {info['trainer']['last_loss']}")
    lines.append("config:")
    lines += [f"  {k:<9} {v}" for k, v in info["config"].items()]
    lines.append("parameters:")
    lines += [f"  {k:<26} {n:>14,}" for k, n in info["parameters"].items()]
    opt = info["optimizer"]
    lines.append("optimizer: " + ", ".join(f"{k} {v}" if k != "kind" else str(v) for k, v in opt.items()))
    z = info["zero"]
    if z:
        lines.append(f"zero: stage {z['zero_stage']}, tp {z['tp']} x pp {z['pp']} x dp {z['dp']}, "
                     f"{z['shards']} shards, {z['bytes'] / 2**20:.2f} MiB (all present)")
    if "tensors" in info:
        lines.append(f"tensors ({len(info['tensors'])}):")
        width = max(map(len, info["tensors"]), default=0)
        lines += [f"  {k:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']}" for k, t in info["tensors"].items()]
    lines.append("ok: complete and consistent")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megaflow inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint directory (step_XXXXXX) or a run's out_dir")
    ap.add_argument("--tensors", action="store_true", help="list every weight with shape and dtype")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    try:
        info = inspect(args.checkpoint, args.tensors)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"megaflow inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=str) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
