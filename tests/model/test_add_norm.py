"""A residual add and its RMSNorm with a one-pass backward (megaflow/model/add_norm.py) compute what
`x + delta` followed by layers.RMSNorm computes, values and gradients.

Contract:
- forward (x + delta and its norm) and backward (the gradients of x, delta and the norm's weight,
  with a gradient arriving on both outputs) equal autograd through RMSNorm, fp32 and bf16 weights;
- the same under torch.compile: through the op where torch compiles it right (2.13), through plain
  ops where it does not (torch 2.11 gave x an all-zero gradient; `COMPILE_SAFE` off), both checked;
- the Triton kernel (CUDA; or triton's interpreter on CPU: TRITON_INTERPRET=1) equals the
  torch reference, with a row count that no program's slab divides evenly.
"""
import pytest
import torch

from megaflow.model import add_norm
from megaflow.model.add_norm import add_rms_norm, rms_norm_backward_reference, rms_norm_forward
from megaflow.model.layers import RMSNorm
from tests.model.util import triton_device


def run(fn, x, delta, norm, g2, gh) -> list:
    x, delta = (t.detach().clone().requires_grad_() for t in (x, delta))
    x2, h = fn(x, delta, norm)
    grads = torch.autograd.grad([x2, h], [x, delta, norm.weight], [g2, gh])
    return [x2.detach(), h.detach(), *grads]


def plain(x, delta, norm):
    x2 = x + delta
    return x2, norm(x2)


def fused(x, delta, norm):
    return add_rms_norm(x, delta, norm.weight, norm.eps)


def case(dtype, N=37, D=24):
    torch.manual_seed(0)
    norm = RMSNorm(D).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x, delta, g2, gh = (torch.randn(2, N, D).to(dtype) for _ in range(4))
    return x, delta, norm, g2, gh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_add_then_rmsnorm(dtype):
    x, delta, norm, g2, gh = case(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(run(fused, x, delta, norm, g2, gh), run(plain, x, delta, norm, g2, gh)):
        assert got.dtype == want.dtype
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), float((got.float() - want.float()).abs().max())


@pytest.mark.parametrize("safe", [add_norm.COMPILE_SAFE, False], ids=["this-torch", "plain-ops"])
def test_fused_under_torch_compile(safe, monkeypatch):
    monkeypatch.setattr(add_norm, "COMPILE_SAFE", safe)
    torch._dynamo.reset()
    x, delta, norm, g2, gh = case(torch.float32)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    names = ("x2", "h", "dx", "ddelta", "dweight")
    for name, got, want in zip(names, run(compiled, x, delta, norm, g2, gh), run(fused, x, delta, norm, g2, gh)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, float((got - want).abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_equals_the_reference(dtype):
    device = triton_device()
    torch.manual_seed(0)
    for N, D in ((1001, 768), (70, 40)):
        x2, dh, dres = (torch.randn(N, D, device=device).to(dtype) for _ in range(3))
        w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
        rstd = rms_norm_forward(x2, w, 1e-5)[1]
        dx, dw = add_norm._triton_backward(dh, x2, rstd, w, dres)
        rdx, rdw = rms_norm_backward_reference(dh, x2, rstd, w, dres)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(dx.float(), rdx.float(), atol=tol, rtol=tol), float((dx.float() - rdx.float()).abs().max())
        assert torch.allclose(dw, rdw, atol=1e-3, rtol=1e-4), float((dw - rdw).abs().max())
