"""What inductor's tuning chose, read from its cache: each kernel's saved launch configuration (`*.best_config`,
written beside the kernel's source when coordinate-descent tuning or autotuning ran, e.g. under
train.compile_mode=tuned), with the Triton kernel it belongs to.

    python3 tools/device/best_configs.py [CACHE_DIR] [--match flex] [--coordesc-only]

CACHE_DIR: TORCHINDUCTOR_CACHE_DIR (default: $TORCHINDUCTOR_CACHE_DIR, else /tmp/inductor, lead12.sh's). One JSON
line a kernel: its name(s), the configuration (block sizes, num_warps, num_stages) and whether coordinate descent
found it. Why: session 12 saw coordinate descent make FlexAttention's kernels 10% faster at h200_1b's real layouts
(docs/benchmarks.md round 11); which kernels it changed says whether a cheaper way than tuning every kernel at
the first compile exists (torch exempts the flex templates themselves from coordinate descent).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

KERNEL = re.compile(r"^def (triton_\w+)\(", re.M)


def best_configs(root: Path, match: str = "", coordesc_only: bool = False) -> list:
    """[{kernels, config, found_by_coordesc, dir}] for every *.best_config under root whose directory's kernel
    source names a kernel containing `match`."""
    out = []
    for cfg_file in sorted(root.rglob("*.best_config")):
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        kernels = sorted({k for src in cfg_file.parent.glob("*.py") for k in KERNEL.findall(src.read_text())})
        if match and not any(match in k for k in kernels):
            continue
        coordesc = bool(config.pop("found_by_coordesc", False))
        if coordesc_only and not coordesc:
            continue
        config.pop("triton_cache_hash", None)
        out.append({"kernels": kernels, "config": config, "found_by_coordesc": coordesc, "dir": cfg_file.parent.name})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor"))
    ap.add_argument("--match", default="", help="only kernels whose name contains this (e.g. flex)")
    ap.add_argument("--coordesc-only", action="store_true")
    args = ap.parse_args(argv)
    rows = best_configs(Path(args.root), args.match, args.coordesc_only)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(json.dumps({"kernels with a saved configuration": len(rows)}))


if __name__ == "__main__":
    main()
