"""Where a synchronous sharded save spends its time, and the save before/after, in one run.

    torchrun --nproc_per_node 2 tools/bench_save.py --device cpu --config configs/bench_tp.yaml \\
        --set parallel.tp=2 --set model.vlm.n_layers=4 --set model.flow.n_layers=2    # ~100 M, TP2, gloo

Builds the engine at the config's layout (ParallelEngine, parallel.zero_stage=0 unless --set; its
init weights, AdamW state from an lr-0 step), takes this rank's pieces (checkpoint_state.state_to_save)
and measures, per rank, on the tensors DCP's writer would receive:
  stage      each box resolved to a compact CPU tensor (GPU -> host copy; a view into a larger
             storage, e.g. a ZeRO partition, copied out), as DCP's loader does
  serialize  torch.save of every tensor into memory, with the zip CRC-32 torch.save computes by
             default, and without it (megaflow's meta.json already holds an xxh3 checksum per file)
  write      the raw bytes written to one file (page cache), then its fsync, then read back and
             hashed (xxh3-128, what the commit did with every file)
Then whole saves, alternating `--repeats` times between barriers (the slowest rank's wall time),
each followed by what the commit then does to checksum the state files for meta.json:
  before     DCP's FileSystemWriter as the save called it before (dcp_boxes.WRITER_THREADS threads,
             CRC-32 on, fsync per file); then rank 0 reads every rank's files back to hash them
  after      parallel.dcp_boxes.save_boxes as it is now (no CRC-32, no fsync, each rank hashing its
             own files as they are written); nothing is read back
Results print on rank 0 (and --json).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compact_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.clone() if t.untyped_storage().size() != t.nbytes else t


class _Sink(io.RawIOBase):
    """Counts the bytes written to it and keeps none."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self.n += n
        return n

    def tell(self) -> int:
        return self.n


def parts(state: dict, directory: Path) -> dict:
    """Seconds of the save's parts on this rank's pieces (see the file docstring)."""
    from parallel.dcp_boxes import Boxes
    t0 = time.perf_counter()
    tensors = [compact_cpu(t) for v in state.values() if isinstance(v, Boxes) for _, t in v.boxes]
    out = {"stage_s": time.perf_counter() - t0, "gb": sum(t.nbytes for t in tensors) / 1e9}
    for crc in (True, False):
        torch.serialization.set_crc32_options(crc)
        t0 = time.perf_counter()
        for t in tensors:
            torch.save(t, _Sink())
        out[f"serialize_{'crc' if crc else 'nocrc'}_s"] = time.perf_counter() - t0
    torch.serialization.set_crc32_options(True)
    path = directory / f"raw_{dist.get_rank()}.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        out["write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        os.fsync(f.fileno())
        out["fsync_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from megaflow.checkpoint import file_digest
    file_digest(path)
    out["hash_read_back_s"] = time.perf_counter() - t0
    path.unlink()
    return {k: round(v, 3) for k, v in out.items()}


def save_before(state: dict, directory: Path) -> None:
    from megaflow.checkpoint import file_digest
    from parallel.dcp_boxes import WRITER_THREADS, _dist, _SavePlanner
    writer = dcp.FileSystemWriter(str(directory), thread_count=WRITER_THREADS)
    dcp.save(state, storage_writer=writer, planner=_SavePlanner(), no_dist=not _dist(None))
    dist.barrier()
    if dist.get_rank() == 0:  # the commit of before: rank 0 hashed every file, one after the other
        {p.name: file_digest(p) for p in sorted(directory.iterdir())}


def save_after(state: dict, directory: Path) -> None:
    from parallel.dcp_boxes import save_boxes
    sums = save_boxes(state, directory)
    every = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sums, every, dst=0)  # what the commit receives instead


def timed(fn, topo) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench_tp.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dir", default="/tmp/megaflow_bench_save")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from parallel.checkpoint_state import state_to_save
    from tools.bench_checkpoint import primed_engine
    device, cfg, topo, dtype, model, stages, engine = primed_engine(args.config, ["parallel.zero_stage=0",
                                                                                  *args.overrides], args.device)
    state = state_to_save(engine, topo)
    root = Path(args.dir) / f"run_{os.getpid() if topo.rank == 0 else 0}"
    box = [str(root) if topo.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    if topo.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    rows = {"before": [], "after": []}
    for i in range(args.repeats):
        for name, fn in (("before", save_before), ("after", save_after)):
            d = root / f"{name}_{i}"
            rows[name].append(round(timed(lambda: fn(state, d), topo), 3))
            if topo.rank == 0:
                shutil.rmtree(d)
    dist.barrier()
    mine = parts(state, root)  # after the saves: the file system is as warm for it as for them
    ranks = [None] * topo.world_size
    dist.all_gather_object(ranks, mine)
    if topo.rank == 0:
        from megaflow.model.starflow import STARFlow2
        from parallel.dcp_boxes import WRITER_THREADS
        with torch.device("meta"):
            n = sum(x.numel() for x in STARFlow2(cfg.model).parameters())  # the whole model
        print(f"{topo.world_size} ranks, tp {topo.tp} pp {topo.pp} dp {topo.dp}, {n / 1e6:.0f} M parameters, "
              f"device {device.type}, {WRITER_THREADS} writer thread(s) per rank")
        for r, m in enumerate(ranks):
            print(f"rank {r} parts: " + ", ".join(f"{k} {v}" for k, v in m.items()))
        for name, ts in rows.items():
            median = sorted(ts)[len(ts) // 2]
            print(f"{name:<7} save: " + " ".join(f"{t:.2f}" for t in ts) + f"  (median {median:.2f} s)")
        shutil.rmtree(root, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"parts": ranks, "saves": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
