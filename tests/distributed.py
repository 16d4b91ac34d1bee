"""Run a function on N real processes with a gloo process group (CPU), for distributed tests.

`run_distributed(fn, world_size, *args)` starts `world_size` processes (forked from the test
session's preloaded forkserver, tests/forked.py: no interpreter start-up per rank; each with this
process's environment and output streams); each calls `fn(rank, world_size, *args)` after
`init_process_group("gloo")` and returns a picklable value. Returns the list of values by rank.
An exception on any rank is re-raised here with its traceback; a rank that hangs fails the test
after `timeout` seconds instead of hanging the suite.
`launch(nproc, argv, ...)`: a command's ranks as torchrun starts them (e.g. `megaflow train`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from tests.forked import InheritFd, Python, adopt, context


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


def start_ranks(fn, world_size: int, *args) -> tuple:
    """Start the `world_size` ranks of `fn` (see the top); returns (processes, queue): each rank puts
    (rank, "ok", value) or (rank, "error", traceback) on the queue when it returns."""
    ctx = context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, dict(os.environ), os.getcwd(),
                                               InheritFd(1), InheritFd(2))) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs, queue


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    procs, queue = start_ranks(fn, world_size, *args)
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


def launch(nproc: int, argv: list, cwd, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC` of `python ARGV` (["-m", module, ...]) without
    torchrun's own start-up: each rank a forked child (tests/forked.py) with the variables torchrun
    gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
    MASTER_PORT; OMP_NUM_THREADS=1 unless set). As torchrun does, the first rank to fail ends the
    others (SIGTERM) and its exit code is the launch's. stdout/stderr: the ranks' outputs, rank by rank."""
    port = free_port()
    ranks = [Python(argv, cwd, {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": str(port), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
             for r in range(nproc)]
    deadline, failed = time.time() + timeout, 0
    running = {r.sentinel: r for r in ranks}
    while running and not failed:
        done = wait(list(running), timeout=max(0.0, deadline - time.time()))
        if not done:
            break
        failed = next((running[s].exitcode for s in done if running[s].exitcode), 0)
        for s in done:
            del running[s]
    for r in running.values():
        r.terminate()
    results = [r.wait(max(1.0, deadline - time.time())) for r in ranks]
    if not failed and running:
        raise subprocess.TimeoutExpired(ranks[0].argv, timeout)
    return subprocess.CompletedProcess(ranks[0].argv, failed, "".join(r.stdout for r in results),
                                       "".join(r.stderr for r in results))
