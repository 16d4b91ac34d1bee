"""Run a function on N real processes with a gloo process group (CPU), for distributed tests.

`run_distributed(fn, world_size, *args)` starts `world_size` processes (forked from the test
session's preloaded forkserver, tests/forked.py: no interpreter start-up per rank; each with this
process's environment and output streams); each calls `fn(rank, world_size, *args)` after
`init_process_group("gloo")` and returns a picklable value. Returns the list of values by rank.
An exception on any rank is re-raised here with its traceback; a rank that hangs fails the test after `timeout` seconds instead of hanging the suite.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist

from tests.forked import InheritFd, adopt, context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, env, cwd, stdout, stderr):
    adopt(env, cwd, stdout, stderr)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ), os.getcwd(),
                                               InheritFd(1), InheritFd(2))) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.terminate()
    if errors:
        raise AssertionError("distributed run failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
