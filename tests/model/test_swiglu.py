"""SiLU(gate) * up with the one-pass backward (megaflow/model/swiglu.py).

Contract:
- the forward is F.silu(gate) * up of the chunks, bit for bit, and the gradient of gate_up is
  autograd's, bit for bit, in fp32 and bf16 (the op's torch arithmetic off CUDA; the CUDA kernel
  is checked against it on the GPU by tools/device/step_micro.py);
- the op is registered so torch.compile traces it (torch.library.opcheck: schema, fake tensor,
  no aliasing), and a compiled SwiGLU gives the eager gradients;
- under no_grad (evaluation, decoding) no autograd Function is involved.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaflow.model.layers import SwiGLU
from megaflow.model.swiglu import silu_mul, swiglu_backward


def autograd_grads(gate_up: torch.Tensor, dm: torch.Tensor) -> tuple:
    x = gate_up.detach().requires_grad_()
    gate, up = x.chunk(2, dim=-1)
    y = F.silu(gate) * up
    y.backward(dm)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(3, 5, 2 * 24, generator=g) * 3).to(dtype)
    dm = torch.randn(3, 5, 24, generator=g).to(dtype)
    want_y, want_grad = autograd_grads(gate_up, dm)
    x = gate_up.clone().requires_grad_()
    y = silu_mul(x)
    y.backward(dm)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_SiluMulBackward"
    assert torch.equal(y.detach(), want_y)
    assert torch.equal(x.grad, want_grad)
    with torch.no_grad():
        assert silu_mul(x).grad_fn is None and torch.equal(silu_mul(x), want_y)


def test_swiglu_backward_op_is_registered_for_compile():
    g = torch.Generator().manual_seed(1)
    torch.library.opcheck(swiglu_backward, (torch.randn(4, 8, generator=g), torch.randn(4, 16, generator=g)))


def test_compiled_swiglu_gradients_equal_eager():
    """The compiled backward graph calls the op (inductor keeps it whole) and equals eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    backward_ops = []

    def keep_backward(gm, _inputs):
        backward_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    x = torch.randn(2, 7, 16)
    grads = []
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=keep_backward)
    for fn in (mlp, torch.compile(mlp, backend=backend, dynamic=False)):
        mlp.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in mlp.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert "megaflow.swiglu_backward.default" in backward_ops and "aten.cat.default" not in backward_ops


def triton_device() -> str:
    """"cuda", or "cpu" under triton's interpreter (TRITON_INTERPRET=1 set, triton installed); else skip."""
    import importlib.util
    import os
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
        return "cpu"
    pytest.skip("no CUDA (nor TRITON_INTERPRET=1 with triton installed) to run the Triton kernel on")


def test_triton_kernel_equals_reference():
    """The kernel (fp32 arithmetic, one rounding) against the reference's arithmetic in float64, within
    bf16 rounding and near autograd's own bf16 result; odd sizes exercise the masks, and rows with a
    padded stride (as inductor lays them out on CUDA) are read in place."""
    from megaflow.model.swiglu import swiglu_backward_reference, swiglu_backward_triton
    device = triton_device()
    g = torch.Generator(device=device).manual_seed(0)
    for shape, pad in (((3, 37, 2 * 700), 0), ((2, 64, 2 * 5632), 0), ((2, 9, 2 * 96), 32)):
        F = shape[-1] // 2
        gate_up = torch.randn(*shape[:-1], shape[-1] + pad, device=device, generator=g).mul(3).bfloat16()[..., :2 * F]
        dm = torch.randn(*shape[:-1], F + pad, device=device, generator=g).bfloat16()[..., :F]
        exact = swiglu_backward_reference(dm.double(), gate_up.double())
        got = swiglu_backward_triton(dm, gate_up)
        err, err_autograd = ((t.double() - exact).norm() / exact.norm()
                             for t in (got, swiglu_backward_reference(dm, gate_up)))
        assert got.dtype == torch.bfloat16 and got.shape == gate_up.shape and got.is_contiguous()
        assert err < 5e-3 and err <= 1.5 * err_autograd, (shape, pad, float(err), float(err_autograd))
