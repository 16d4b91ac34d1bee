"""A Triton kernel with a torch fallback: built at its first use, given up once it fails.

The model's one-pass kernels (rope.py, swiglu.py, add_norm.py) and the optimizer's flat AdamW
(megaflow/flat_adamw.py) run on CUDA as Triton kernels and elsewhere as the same arithmetic in torch
ops. `TritonKernel(what, build)` holds one such kernel (or a tuple of them, whatever `build()`
returns): `.get()` builds it on first use; `.call(cuda, fast, reference)` runs `fast()` on CUDA until
it raises once (no Triton, a build error: the fast paths write nothing before their launch), then
warns with `what` and runs `reference()` from then on.

Except while a CUDA graph is being captured (train.step_graph=on): there a failure is re-raised,
naming the kernel. A failed launch has already invalidated the capture, so switching to torch ops
would only hide the cause behind CUDA's later "operation failed due to a previous error during
capture" (the graph's eager warm-up steps build and load every kernel before the capture).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import torch

log = logging.getLogger("megaflow")
T = TypeVar("T")


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TritonKernel:
    def __init__(self, what: str, build: Callable[[], Any]):
        self.what, self._build, self._built, self.failed = what, build, None, False

    def get(self) -> Any:
        """The kernel(s), built (Triton imported and jitted) at the first call."""
        if self._built is None:
            self._built = self._build()
        return self._built

    def call(self, cuda: bool, fast: Callable[[], T], reference: Callable[[], T]) -> T:
        if cuda and not self.failed:
            try:
                return fast()
            except Exception as e:  # noqa: BLE001 - no Triton, or its build failed: nothing was written
                if capturing():
                    raise RuntimeError(f"the {self.what} failed inside a CUDA graph capture "
                                       f"({type(e).__name__}: {str(e)[:300]})") from e
                self.failed = True
                log.warning("the %s did not run (%s: %s); torch ops from now on", self.what, type(e).__name__,
                            str(e)[:200])
        return reference()
