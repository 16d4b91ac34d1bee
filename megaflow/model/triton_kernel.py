"""A Triton kernel with a torch fallback: built at its first use, given up once it fails.

The model's one-pass kernels (rope.py, swiglu.py, add_norm.py) run on CUDA as Triton kernels and
elsewhere as the same arithmetic in torch ops. `TritonKernel(what, build)` holds one such kernel (or
a tuple of them, whatever `build()` returns): `.get()` builds it on first use; `.call(cuda, fast,
reference)` runs `fast()` on CUDA until it raises once (no Triton, a build error: the fast paths
write nothing before their launch), then warns with `what` and runs `reference()` from then on.

Not here: the kernels themselves, and the optimizer's flat AdamW (megaflow/optim.py falls back to
torch's fused AdamW, undoing its step count: its own rule).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

log = logging.getLogger("megaflow")
T = TypeVar("T")


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
                self.failed = True
                log.warning("the %s did not run (%s: %s); torch ops from now on", self.what, type(e).__name__,
                            str(e)[:200])
        return reference()
