"""megaflow/model/triton_kernel.py: the fallback rule the one-pass kernels share.

Contract: off CUDA the fast path is never tried; on CUDA it runs until it raises once, then a
warning names the kernel and the torch reference runs from then on, the fast path never again;
the kernel is built at its first use, not at import. While a CUDA graph is being captured a
failure is re-raised, naming the kernel, and nothing switches to the reference.
"""
import logging

import pytest

from megaflow.model import triton_kernel
from megaflow.model.triton_kernel import TritonKernel


def test_fast_until_it_fails_once_then_the_reference_for_good(caplog):
    built, tries = [], []
    k = TritonKernel("test kernel", lambda: built.append(1) or "jitted")
    assert built == []  # nothing built at construction
    assert k.call(False, lambda: tries.append("cpu") or "fast", lambda: "ref") == "ref" and tries == []
    assert k.call(True, lambda: k.get(), lambda: "ref") == "jitted" and built == [1]
    k.get()
    assert built == [1]  # built once

    def boom():
        tries.append("boom")
        raise RuntimeError("no triton")
    with caplog.at_level(logging.WARNING, logger="megaflow"):
        assert k.call(True, boom, lambda: "ref") == "ref"
        assert k.call(True, boom, lambda: "ref2") == "ref2"
    assert tries == ["boom"] and k.failed
    assert [r.getMessage() for r in caplog.records] == \
        ["the test kernel did not run (RuntimeError: no triton); torch ops from now on"]


def test_a_failure_inside_a_graph_capture_is_raised_not_hidden(monkeypatch):
    monkeypatch.setattr(triton_kernel, "capturing", lambda: True)
    k, refs = TritonKernel("flat AdamW kernel", lambda: "jitted"), []

    def launch_fails():
        raise RuntimeError("operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match=r"the flat AdamW kernel failed inside a CUDA graph capture "
                                           r"\(RuntimeError: operation not permitted"):
        k.call(True, launch_fails, lambda: refs.append("ref"))
    assert refs == [] and not k.failed  # no switch: the next (eager) call tries the kernel again
    assert k.call(True, lambda: "fast", lambda: "ref") == "fast"
