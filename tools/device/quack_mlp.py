"""SwiGLU MLPs with the activation fused into the GEMMs (quack-kernels' CuTe DSL gated GEMMs) against
megaflow's (cuBLAS GEMMs around `silu_mul` and its one-pass Triton backward), one MLP forward + backward
replayed as a CUDA graph, at h200_1b's and TarFlow's shapes.

    python3 tools/device/quack_mlp.py [--shapes vlm,flow,tarflow] [--untuned]

quack (PyPI quack-kernels, installed with FlashAttention-4 by tools/device/fa4_setup.sh) runs the gate/up
GEMM with SiLU(gate) * up in its epilogue (writing the pre-activation and the product) and the down
projection's input-gradient GEMM with the SwiGLU backward in its epilogue (`mlp_func`, concat_layout: the
[gate; up] rows megaflow's `gate_up` weight has). Rows:
  megaflow  F.linear, silu_mul (megaflow/model/swiglu.py), F.linear under torch.compile, as a block compiles it
  quack     quack.mlp.mlp_func(x, W_gate_up, W_down, "swiglu", concat_layout=True) (autotuned; --untuned: not)
Each row: median ms of the graph's replays (tools/device/tarflow_block.graphed_ms), x the layer count of
that stream = ms a step, and the largest difference of quack's output and x/W gradients from megaflow's,
relative to each tensor's largest magnitude.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megaflow.model.swiglu import silu_mul  # noqa: E402
from tools.device.tarflow_block import graphed_ms  # noqa: E402

# name: (tokens a step, width, SwiGLU width, layers a step): h200_1b's 16 x 1,024 tokens; TarFlow's 32 x 1,040
SHAPES = {"vlm": (16384, 2048, 5632, 16), "flow": (16384, 1024, 2816, 8), "tarflow": (33280, 768, 2128, 64)}


def megaflow_mlp(x, w1, w2):
    return F.linear(silu_mul(F.linear(x, w1)), w2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="vlm,flow,tarflow")
    ap.add_argument("--untuned", action="store_true", help="quack's default GEMM configs, not its autotuner's")
    args = ap.parse_args(argv)
    from quack.mlp import mlp_func
    compiled = torch.compile(megaflow_mlp, dynamic=False)
    dev, dt = torch.device("cuda"), torch.bfloat16
    for name in args.shapes.split(","):
        M, D, Fd, layers = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(0)
        x = (torch.randn(M, D, device=dev, dtype=dt, generator=g)).requires_grad_()
        w1 = (torch.randn(2 * Fd, D, device=dev, dtype=dt, generator=g) * D ** -0.5).requires_grad_()
        w2 = (torch.randn(D, Fd, device=dev, dtype=dt, generator=g) * Fd ** -0.5).requires_grad_()
        dy = torch.randn(M, D, device=dev, dtype=dt, generator=g)
        rows = {"megaflow": compiled,
                "quack": lambda x, w1, w2: mlp_func(x, w1, w2, "swiglu", tuned=not args.untuned, concat_layout=True)}
        got, out = {}, {}
        for row, fn in rows.items():
            try:
                def step(fn=fn):  # autograd.grad: no AccumulateGrad node in the graph
                    y = fn(x, w1, w2)
                    return (y, *torch.autograd.grad(y, (x, w1, w2), dy))
                ms = graphed_ms(step)
                got[row] = [t.detach().float() for t in step()]
                out[row] = {"ms_per_layer": round(ms, 4), "ms_per_step": round(layers * ms, 2)}
            except Exception as e:  # noqa: BLE001 - one row failing must not hide the other
                out[row] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        if len(got) == 2:
            out["quack"]["max_rel_diff (y, dx, dW1, dW2)"] = [
                round(float((a - b).abs().max() / b.abs().max()), 5) for a, b in zip(got["quack"], got["megaflow"])]
        if all("ms_per_step" in r for r in out.values()):
            out["saved_ms_per_step"] = round(out["megaflow"]["ms_per_step"] - out["quack"]["ms_per_step"], 2)
        print(json.dumps({name: {"tokens": M, "dim": D, "ffn": Fd, "layers": layers, **out}}), flush=True)


if __name__ == "__main__":
    main()
