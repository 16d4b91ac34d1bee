"""The `megaflow` command: train, generate, info, data, fae.

    megaflow train [--config configs/X.yaml] [--set a.b=v ...] [--resume | --overwrite]   (none: the default run)
    megaflow generate --checkpoint DIR (--prompt TEXT | --image PNG | --interleaved TEXT) [...]
    megaflow info --config configs/X.yaml [--set ...] [--help-config]
    megaflow data build NAME --out DIR [...]        (data_pipeline's commands)
    megaflow fae --config configs/fae_digits.yaml   (train the FAE latent space on its own)
    megaflow inspect|reshard|profile ...            (tools/inspect_checkpoint.py, reshard.py, profile_step.py)
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict


def count_parameters(model) -> "OrderedDict[str, int]":
    """Parameter count of each part of a (meta-device) STARFlow2."""
    from megaflow.model.starflow import param_group
    parts = OrderedDict((k, 0) for k in ("vlm stream", "visual adapter", "deep flow stream", "shallow flows",
                                         "couplings (W_vlm, W_d)", "fae"))
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = param_group(name)
        if group == "flow":
            part = "shallow flows" if name.startswith("shallow.") else "deep flow stream"
        else:
            part = {"vlm": "vlm stream", "adapter": "visual adapter", "couple_in": "couplings (W_vlm, W_d)",
                    "couple_out": "couplings (W_vlm, W_d)", "fae": "fae"}[group]
        parts[part] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def cmd_info(argv):
    import torch

    from megaflow.config import describe, load_config
    from megaflow.model.starflow import STARFlow2, apply_stage
    ap = argparse.ArgumentParser(prog="megaflow info", description="Parameter counts of a config's model.")
    ap.add_argument("--config", help="YAML config (default: built-in defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its help")
    args = ap.parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):
        model = STARFlow2(cfg.model)
    trainable = set(apply_stage(model, cfg.model.stage))
    n_train = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    print(f"config: {args.config or '(defaults)'}   stage: {cfg.model.stage}")
    for part, n in count_parameters(model).items():
        print(f"  {part:<26} {n:>14,}")
    print(f"  {'trainable in this stage':<26} {n_train:>14,}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "megaflow.train", "generate": "megaflow.generate_cli", "data": "data_pipeline.cli",
                "fae": "megaflow.model.fae_train",
                "inspect": "tools.inspect_checkpoint",  # checkpoint contents and checks
                "reshard": "tools.reshard",  # -> one process, -> sharded, fp32 export, VLM -> Hugging Face
                "profile": "tools.profile_step"}  # step time, tokens/s, MFU, torch.profiler trace
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return cmd_info(rest)
    if cmd not in commands:
        print(f"megaflow: unknown command {cmd!r}; choose one of: info, {', '.join(commands)}", file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(commands[cmd]).main(rest) or 0


def entry():
    from megaflow.config import ConfigError
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"megaflow: config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entry()
