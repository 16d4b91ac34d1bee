"""The command-line options every torchrun benchmark shares (tools/bench_tp.py, bench_zero.py,
bench_scaling.py): which run config, its `--set` overrides, the tiny test model instead, the device.
Each tool adds its own options after these and reads `args.config`, `args.set`, `args.tiny`,
`args.device`. Not here: loading the config (each tool builds what it needs from it).
"""
from __future__ import annotations

import argparse

import torch


def bench_args(parser: argparse.ArgumentParser, config: str = "configs/h200_1b.yaml",
               sections: str = "model, data, train") -> argparse.ArgumentParser:
    """Add --config (default `config`; `sections` names what the tool reads of it), --set, --tiny
    and --device (default cuda when there is one) to `parser`; returns it."""
    parser.add_argument("--config", default=config, help=f"run config ({sections} sections)")
    parser.add_argument("--set", action="append", default=[], help="override a.b=value (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="tests/helpers.tiny_config instead of --config")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    return parser
