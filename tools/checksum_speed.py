"""How long the per-file checkpoint checksum (megaflow/checkpoint.py, xxh3-128) costs at the size of a
config's checkpoint, beside other hashes and beside torch.save of the same bytes, on this CPU.

    python tools/checksum_speed.py --config configs/h200_1b.yaml [--file-gib 1]

The parameter count comes from the config's model built on the meta device; model.pt holds it in
fp32 (4 bytes each) and optim.pt AdamW's two fp32 moments (8 bytes each). Each hash digests a
stream of that many bytes (a 256 MiB random buffer fed repeatedly: hash speed does not depend on
the content), so nothing of model size is allocated; sha256 and blake2b, ~10x slower, digest
2 GiB and their seconds are that rate extrapolated (marked "est."). Then `file_digest` reads a
real `--file-gib` file (page cache warm, as right after torch.save wrote it) and torch.save of a
tensor of that size is timed as the baseline the checksum adds to. Prints a JSON report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megaflow.checkpoint import file_digest  # noqa: E402

CHUNK = 256 << 20


def n_params(config: str) -> int:
    from megaflow.config import load_config
    from megaflow.model.starflow import STARFlow2
    cfg = load_config(config)
    with torch.device("meta"):
        model = STARFlow2(cfg.model)
    return sum(p.numel() for p in model.parameters())


def rate(make, buf: memoryview, total: int) -> tuple:
    """(seconds, GB/s) of hashing `total` bytes of `buf` repeated."""
    h = make()
    t = time.perf_counter()
    done = 0
    while done < total:
        n = min(len(buf), total - done)
        h.update(buf[:n])
        done += n
    h.hexdigest()
    dt = time.perf_counter() - t
    return dt, total / dt / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="checksum_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/h200_1b.yaml")
    ap.add_argument("--file-gib", type=float, default=1.0, help="size of the real file read by file_digest")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    params = n_params(args.config)
    sizes = {"model.pt": 4 * params, "optim.pt": 8 * params}
    total = sum(sizes.values())
    buf = memoryview(os.urandom(CHUNK))
    report = {"config": args.config, "parameters": params, "bytes": sizes, "hashes": {}}
    for name, make, full in (("xxh3_128", xxhash.xxh3_128, True), ("xxh3_64", xxhash.xxh3_64, True),
                             ("blake2b", hashlib.blake2b, False), ("sha256", hashlib.sha256, False)):
        dt, gbs = rate(make, buf, total if full else 2 << 30)
        report["hashes"][name] = {"GB/s": round(gbs, 2), "model.pt s": round(sizes["model.pt"] / gbs / 1e9, 2),
                                  "model+optim s": round(total / gbs / 1e9, 2), "measured": full}
    n = int(args.file_gib * (1 << 30))
    tensor = torch.empty(n // 4, dtype=torch.float32).uniform_()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        path = Path(d) / "blob.pt"
        t = time.perf_counter()
        torch.save({"w": tensor}, path)
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        file_digest(path)
        digest_s = time.perf_counter() - t
    gib = n / (1 << 30)
    report["file"] = {"GiB": gib, "torch.save s": round(save_s, 2), "file_digest s": round(digest_s, 2),
                      "file_digest GB/s": round(n / digest_s / 1e9, 2),
                      "checksum / save": round(digest_s / save_s, 3)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
