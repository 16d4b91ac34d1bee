"""On a GPU: does `megaflow::wgrad_accumulate` (parallel/wgrad_fusion.py) run torch's fp32-accumulating bf16
GEMM into an fp32 C (addmm out_dtype=fp32, beta = 1), with the right numbers, and what does one weight
gradient of h200_1b's shapes cost fused against unfused (a bf16 dW, then the flush's fp32 add)?

    PYTHONPATH=$PWD python3 tools/device/wgrad_probe.py      # one line per shape, then PROBE ok / fallback
"""
import torch

from parallel.wgrad_fusion import _ADDMM_DTYPE, wgrad_accumulate


def timed(fn, reps: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    rows = 4 * 1024  # one 4-row micro-batch of 1,024 tokens
    for n, k in ((2 * 5632, 2048), (2048, 5632), (4096, 2048), (2048, 2048)):  # gate_up, down, qkv, o_proj
        dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(n, k, device="cuda")
        wgrad_accumulate(main_grad, dy, x)
        wgrad_accumulate(main_grad, dy, x)
        err = float((main_grad - 2 * (dy.float().t() @ x.float())).abs().max())
        fused = timed(lambda: wgrad_accumulate(main_grad, dy, x))
        unfused = timed(lambda: main_grad.add_(dy.t() @ x))  # the bf16 .grad, then the flush's add
        print(f"dW ({n} x {k}) over {rows} rows: fused {fused:.3f} ms, unfused (bf16 GEMM + fp32 add) "
              f"{unfused:.3f} ms, max |error| of two sums {err:.2e}", flush=True)
    how = "addmm out_dtype=fp32 into fp32 C" if _ADDMM_DTYPE[0] else "FALLBACK (bf16 GEMM + add)"
    print(f"PROBE wgrad_accumulate: {how} (torch {torch.__version__})", flush=True)


if __name__ == "__main__":
    main()
