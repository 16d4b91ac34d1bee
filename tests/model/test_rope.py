"""RoPE on the fused QKV output as one op (megaflow/model/rope.py) computes the definition.

Contract:
- `qkv_rope` (q and k rotated by `apply_rope`, v split off, each (B, H, T, hd) in qkv's (B, T, H, hd)
  memory order, so attention's output reshapes without a copy; v a view of qkv) and its backward
  (the QKV gradient, un-rotated, in qkv's layout) equal `apply_rope` on views of qkv under autograd,
  with grouped-query heads, per-row and broadcast tables, and non-contiguous incoming gradients;
- the op traces under torch.compile (one opaque op, its backward in the backward graph) and gives
  the eager values;
- the Triton kernels (CUDA; or triton's interpreter on CPU: TRITON_INTERPRET=1) equal the
  torch reference in fp32 and bf16, including a T that is not a multiple of the kernel's block.
"""
from __future__ import annotations

import pytest
import torch

from megaflow.model import rope
from megaflow.model.rope import apply_rope, qkv_rope, rope_tables
from tests.model.util import triton_device


def reference(qkv: torch.Tensor, cos, sin, n_q: int, n_kv: int) -> tuple:
    x = qkv.transpose(1, 2)  # (B, H, T, hd) views
    qk = apply_rope(x[:, :n_q + n_kv].float(), cos.float(), sin.float()).to(qkv.dtype)
    return qk[:, :n_q], qk[:, n_q:], x[:, n_q + n_kv:]


def case(B=2, T=70, n_q=4, n_kv=2, hd=16, per_row=True, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    qkv = torch.randn(B, T, n_q + 2 * n_kv, hd, device=device).to(dtype)
    pos = torch.arange(T, device=device)[None].expand(B if per_row else 1, T) + 3
    cos, sin = rope_tables(pos, hd, 10000.0, dtype)
    grads = [torch.randn(B, h, T, hd, device=device).to(dtype) for h in (n_q, n_kv, n_kv)]
    grads[2] = grads[2].transpose(2, 3).contiguous().transpose(2, 3)  # a gradient whose last dim is strided
    return qkv, cos, sin, grads


def values_and_grad(fn, qkv, cos, sin, grads, n_q, n_kv) -> tuple:
    x = qkv.detach().clone().requires_grad_()
    outs = fn(x, cos, sin, n_q, n_kv)
    dx, = torch.autograd.grad(outs, x, grads)
    return [o.detach() for o in outs], dx


@pytest.mark.parametrize("per_row", [True, False])
def test_op_equals_apply_rope_under_autograd(per_row):
    qkv, cos, sin, grads = case(per_row=per_row)
    got, dgot = values_and_grad(qkv_rope, qkv, cos, sin, grads, 4, 2)
    want, dwant = values_and_grad(reference, qkv, cos, sin, grads, 4, 2)
    assert all(g.transpose(1, 2).is_contiguous() for g in got[:2]) and dgot.shape == qkv.shape
    v = qkv_rope(qkv, cos, sin, 4, 2)[2]
    assert v.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()  # a view, not a copy
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6), float((g - w).abs().max())
    assert torch.allclose(dgot, dwant, atol=1e-5), float((dgot - dwant).abs().max())


def test_op_under_torch_compile():
    qkv, cos, sin, grads = case(n_q=2, n_kv=2, per_row=False)
    compiled = torch.compile(qkv_rope, backend="aot_eager", fullgraph=True, dynamic=False)
    got, dgot = values_and_grad(compiled, qkv, cos, sin, grads, 2, 2)
    want, dwant = values_and_grad(qkv_rope, qkv, cos, sin, grads, 2, 2)
    for g, w in zip(got + [dgot], want + [dwant]):
        assert torch.equal(g, w)


def test_bad_layout_is_refused():
    qkv, cos, sin, _ = case()
    with pytest.raises(ValueError, match=r"qkv_rope: qkv \(2, 70, 8, 16\)"):
        qkv_rope(qkv, cos, sin, 4, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_equal_the_reference(dtype):
    device = triton_device()
    for per_row, (T, n_q, n_kv, hd) in ((True, (70, 4, 2, 16)), (False, (128, 3, 3, 64))):
        qkv, cos, sin, grads = case(2, T, n_q, n_kv, hd, per_row, dtype, device)
        got = rope._triton_forward(qkv, cos, sin, n_q, n_kv)
        want = reference(qkv, cos, sin, n_q, n_kv)[:2]
        assert all(g.transpose(1, 2).is_contiguous() for g in got)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        for g, w in zip(got, want):
            assert torch.allclose(g.float(), w.float(), atol=tol, rtol=tol), float((g.float() - w.float()).abs().max())
        dgot = rope._triton_backward(*grads, cos, sin)
        _, dwant = values_and_grad(reference, qkv.float(), cos.float(), sin.float(), [g.float() for g in grads], n_q, n_kv)
        assert torch.allclose(dgot.float(), dwant, atol=5 * tol, rtol=tol), float((dgot.float() - dwant).abs().max())
