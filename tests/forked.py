"""Child processes for the tests without paying Python's start-up every time.

A fresh interpreter spends 2-6 s of CPU importing torch, the Streaming reader (which pulls in
transformers and scikit-learn) and DeepSpeed before it does anything; the suite started over 100 of
them. Here one multiprocessing forkserver per test session imports all that once (PRELOAD) and
every child is a fork of it: still its own process (own PID, memory, Streaming shared memory,
torch thread settings, signal handlers, exit code; a crash or kill is a real one), started in
~0.1 s. Each child gets the parent's current environment, working directory, and stdout/stderr.

- `context()`: the multiprocessing context (tests/distributed.py starts its gloo ranks with it);
- `run_python(argv, cwd, env)`: `python -m MODULE ARGS` or `python -c SCRIPT ARGS` as such a child,
  returning a subprocess.CompletedProcess (returncode, stdout, stderr), like subprocess.run with
  capture_output=True, text=True; `Python(argv, cwd, env)` starts one and `.wait()` collects it.
Not for: launchers (torchrun, srun, bash scripts) and tests that signal a process they started
with Popen; those stay real subprocesses.
"""
from __future__ import annotations

import atexit
import os
import runpy
import subprocess
import sys
import tempfile
from multiprocessing import reduction

import torch.multiprocessing as mp

# What the children would import anyway (a module that fails to import here is imported by the child).
PRELOAD = ["torch", "torch.distributed", "numpy", "pytest", "megaflow.cli", "megaflow.train", "megaflow.inference",
           "parallel.runtime", "parallel.engine", "parallel.checkpoint", "tests.helpers"]
# These read the environment when imported, so only when it is the one tools/run_tests.sh sets (else
# the children import them): the Streaming reader (-> transformers, huggingface_hub: HF_HUB_OFFLINE)
# and DeepSpeed (DS_ACCELERATOR picks its accelerator).
PRELOAD_IF = {"data_pipeline.loader": ("HF_HUB_OFFLINE", "1"), "deepspeed": ("DS_ACCELERATOR", "cpu")}


def context():
    """The forkserver context; its server (started by the first child) preloads PRELOAD."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + [m for m, (k, v) in PRELOAD_IF.items() if os.environ.get(k) == v])
    return ctx


class InheritFd:
    """A file descriptor of this process that the child receives as its own (sent over the
    forkserver's socket when the child's arguments are pickled); unpickled, it is an int."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def adopt(env: dict, cwd: str, stdout: int, stderr: int) -> None:
    """In the child: the parent's environment, directory and output streams."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(stdout, 1), os.dup2(stderr, 2)
    os.close(stdout), os.close(stderr)


def _python(argv: list, env: dict, cwd: str, stdout: int, stderr: int) -> None:
    adopt(env, cwd, stdout, stderr)
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            assert argv[0] == "-c", argv
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    finally:  # the child ends with os._exit: run what a normal interpreter exit runs
        atexit._run_exitfuncs()


class Python:
    """`python ARGV` (ARGV = ["-m", module, ...] or ["-c", script, ...]) started in a forked child
    with `env` (default: this process's) in `cwd`; `.wait(timeout)` collects its output as text."""

    def __init__(self, argv: list, cwd, env: dict | None = None):
        self.argv = [sys.executable, *map(str, argv)]
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.child = context().Process(target=_python, args=(self.argv[1:], dict(os.environ if env is None else env),
                                                             str(cwd), InheritFd(self.out.fileno()),
                                                             InheritFd(self.err.fileno())))
        self.child.start()

    @property
    def exitcode(self) -> int | None:
        """The child's exit code (minus the signal that ended it), None while it runs."""
        return self.child.exitcode

    @property
    def sentinel(self) -> int:
        """A handle that `multiprocessing.connection.wait` sees ready when the child ends."""
        return self.child.sentinel

    def terminate(self) -> None:
        """SIGTERM to the child (it may clean up)."""
        self.child.terminate()

    def kill(self) -> None:
        """SIGKILL to the child if it still runs, and reap it."""
        if self.child.exitcode is None:
            self.child.kill()
            self.child.join()

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """The finished child's exit code and output; subprocess.TimeoutExpired (after killing it) past
        `timeout` seconds."""
        try:
            self.child.join(timeout)
            if self.child.exitcode is None:
                self.kill()
                raise subprocess.TimeoutExpired(self.argv, timeout)
            self.out.seek(0), self.err.seek(0)
            return subprocess.CompletedProcess(self.argv, self.child.exitcode, self.out.read().decode(errors="replace"),
                                               self.err.read().decode(errors="replace"))
        finally:
            self.out.close(), self.err.close()


def run_python(argv: list, cwd, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGV` in a forked child, to its end: like subprocess.run(capture_output=True, text=True)."""
    return Python(argv, cwd, env).wait(timeout)
