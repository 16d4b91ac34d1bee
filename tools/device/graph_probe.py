"""Why a training step does not capture as one CUDA graph (train.step_graph=on), and a graphed profile
with what captures (issue 13, the h200_1b row). On the device; one process per capture attempt, since
a failed capture leaves CUDA's default generator unusable in its process.

    python3 tools/device/graph_probe.py probe [--swiglu triton|torch|plain] [--flat 1|0] [--mode global|thread_local]
        tests/train/test_step_graph.py's tiny TarFlow-only step, captured while every dispatched op and
        this branch's two Triton launches are checked (cuStreamIsCapturing): prints the first one after
        which the capture was invalidated; exit status 0 when the capture succeeded.
    python3 tools/device/graph_probe.py isolate [--case kernel|compiled|flat|torch] [--mode ...]
        the optimizer alone, captured: `kernel` the flat AdamW Triton launch (flat_adamw.adamw_triton)
        on 1M-element buffers, `compiled` its torch definition through torch.compile instead, `flat` MainWeights.clip_and_step with the flat kernel on a small bf16 MLP
        (forward, backward and step in the graph), `torch` the same with torch's fused AdamW; each after
        2 eager warm-up calls on a side stream, then 2 replays checked against eager calls.
    python3 tools/device/graph_probe.py search -- PROFILE_STEP_ARGS
        probes the settings below in order (subprocesses); with the first that captures, runs
        tools/profile_step.py PROFILE_STEP_ARGS in a subprocess under those settings.

Settings: --swiglu triton (megaflow/model/swiglu.py's kernel), torch (its op, torch arithmetic), plain
(no custom op: chunk, silu, mul under autograd); --flat 1 (MainWeights' one-pass flat AdamW, the
default) or 0 (torch's fused AdamW, capturable); --mode: torch.cuda.graph's capture_error_mode.
Seen on the H200 (2026-11-30, session 7): `isolate` found why flat 1 failed to capture: the Triton
kernel captures; `torch._foreach_add_(steps, 1 - found_inf)` bound the 0-d tensor to its Scalar
overload, a host read ("operation not permitted when stream is capturing"). The per-op check of
`probe` missed it because the failing op raised before its check ran.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import subprocess
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ORDER = [("triton", "1", "global"), ("triton", "0", "global"), ("triton", "1", "thread_local"),
         ("torch", "1", "global"), ("plain", "1", "global"), ("plain", "0", "global")]


def apply_settings(swiglu: str, flat: str, mode: str) -> None:
    """Process-wide switches (monkeypatches) for one attempt; nothing is written to disk."""
    import megaflow.model.layers as layers
    import megaflow.model.swiglu as sw
    import megaflow.optim as optim
    if swiglu == "torch":
        sw._triton_failed = True
    elif swiglu == "plain":
        def plain(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        layers.silu_mul = plain
    if flat == "0":
        init = optim.MainWeights.__init__

        @functools.wraps(init)
        def no_flat(self, *a, **k):
            init(self, *a, **k)
            self.flat_step = False
        optim.MainWeights.__init__ = no_flat
    torch.cuda.graph = functools.partial(torch.cuda.graph, capture_error_mode=mode)


_cuda = None


def capture_status() -> int:
    """0 not capturing, 1 capturing, 2 invalidated: the current stream's (driver API); a failing query
    (on the H200 run of 2026-11-30 none was seen as invalidated, so the query's own error counts) is 2."""
    global _cuda
    if _cuda is None:
        _cuda = ctypes.CDLL("libcuda.so.1")
    status = ctypes.c_int(-1)
    rc = _cuda.cuStreamIsCapturing(ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), ctypes.byref(status))
    return 2 if rc != 0 else status.value


class Watch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the first op (or wrapped launch) after which the current stream's capture was invalidated."""
    def __init__(self):
        super().__init__()
        self.first, self.previous, self.seen = None, "start", 0

    def check(self, name: str) -> None:
        self.seen += 1
        if self.first is None and capture_status() == 2:
            self.first = f"{name} (after {self.previous})"
        self.previous = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.check(str(func))
        return out


def probe(args) -> int:
    apply_settings(args.swiglu, args.flat, args.mode)
    import megaflow.flat_adamw as fa
    import megaflow.model.swiglu as sw
    import megaflow.step_graph as sg
    from tests.train import test_step_graph as t
    watch = Watch()
    for mod, name in ((fa, "adamw_triton"), (sw, "swiglu_backward_triton")):
        fn = getattr(mod, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            out = _fn(*a, **k)
            if torch.cuda.is_current_stream_capturing():
                watch.check(_name)
            return out
        setattr(mod, name, wrapped)
    capture = sg.StepGraph._capture

    def watched_capture(self, *a, **k):
        with watch:
            return capture(self, *a, **k)
    sg.StepGraph._capture = watched_capture
    label = f"swiglu={args.swiglu} flat={args.flat} mode={args.mode}"
    try:
        engine, outs = t.train("on", doc_ids=False, flat_step=args.flat == "1")
        ok = engine.graph.graph is not None
    except Exception as e:  # noqa: BLE001 - the report is the point
        print(f"[probe {label}] FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc()  # the chained cause names the call inside the step that raised
        ok = False
    print(f"[probe {label}] {'captured' if ok else 'not captured'}; first op after the capture broke: "
          f"{watch.first}; {watch.seen} ops checked", flush=True)
    return 0 if ok else 1


def isolate(args) -> int:
    """One optimizer-only capture (see the module docstring); exit status 0 when it captured, replayed
    and matched the eager calls."""
    import logging
    logging.basicConfig(level=logging.INFO)
    from megaflow.config import load_config
    from megaflow.flat_adamw import adamw_reference, adamw_triton
    from megaflow.optim import MainWeights, param_groups, set_lr
    dev, label = torch.device("cuda"), f"[isolate {args.case} mode={args.mode}]"
    torch.manual_seed(0)
    lr = torch.full((), 1e-3, device=dev)
    if args.case in ("kernel", "compiled"):
        n = 1 << 20
        bufs = [torch.randn(n, device=dev), torch.randn(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev),
                torch.empty(n, dtype=torch.bfloat16, device=dev), torch.rand(n, device=dev) < 0.7]
        step, scale, inf = torch.zeros((), device=dev), torch.full((), 2.0, device=dev), torch.zeros((), device=dev)
        ref = [b.clone() for b in bufs]
        ref_step = step.clone()

        fast = adamw_triton if args.case == "kernel" else torch.compile(adamw_reference, fullgraph=True, dynamic=False)

        def fn(b=bufs, s=step, f=fast):
            s.add_(1)
            f(*b, s, lr, 0.9, 0.95, 1e-8, 0.1, scale, inf)
        fn_ref = functools.partial(fn, ref, ref_step, adamw_reference)
        state = lambda: bufs[:4]  # noqa: E731
        state_ref = lambda: ref[:4]  # noqa: E731
    else:
        cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"))
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).to(dev)
            w = MainWeights(model, param_groups(model, 0.1), cfg.train, torch.bfloat16, flat_step=args.case == "flat")
            set_lr(w.optimizer, lr)
            for group in w.optimizer.param_groups:
                group["capturable"] = True
            x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)

            def fn(model=model, w=w, x=x):
                w.zero_grad()
                model(x).float().pow(2).mean().backward()
                w.grads_to_main()
                w.clip_and_step(0.5)
            runs.append((fn, w))
        (fn, w), (fn_ref, w_ref) = runs
        state, state_ref = (lambda: [w.flat_main]), (lambda: [w_ref.flat_main])
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
                fn_ref()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=args.mode):
            fn()
        for _ in range(2):
            graph.replay()
            fn_ref()
        torch.cuda.synchronize()
        err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(state(), state_ref()))
        flat = f", flat_step {w.flat_step}" if args.case in ("flat", "torch") else ""
        print(f"{label} captured and replayed; max relative difference to the eager calls {err:.2e}{flat}", flush=True)
        return 0 if err < 1e-5 else 1
    except Exception as e:  # noqa: BLE001 - the report is the point
        print(f"{label} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
        traceback.print_exc()
        return 1


def search(args, rest: list) -> int:
    """The first setting whose tiny step captures AND whose profile's graphed rows captured too."""
    here = [sys.executable, str(Path(__file__).resolve())]
    for swiglu, flat, mode in ORDER:
        setting = ["--swiglu", swiglu, "--flat", flat, "--mode", mode]
        if subprocess.run(here + ["probe"] + setting, timeout=120).returncode != 0:
            continue
        print(f"[search] profiling with {' '.join(setting)}", flush=True)
        res = subprocess.run(here + ["profile"] + setting + ["--"] + rest, capture_output=True, text=True)
        print(res.stdout[-6000:], res.stderr[-1500:] if res.returncode else "", flush=True)
        if "could not be captured" not in res.stdout:
            return res.returncode
    print("[search] no setting captured", flush=True)
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["probe", "isolate", "search", "profile"])
    ap.add_argument("--case", default="kernel", choices=["kernel", "compiled", "flat", "torch"])
    ap.add_argument("--swiglu", default="triton", choices=["triton", "torch", "plain"])
    ap.add_argument("--flat", default="1", choices=["1", "0"])
    ap.add_argument("--mode", default="global", choices=["global", "thread_local", "relaxed"])
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.what == "probe":
        return probe(args)
    if args.what == "isolate":
        return isolate(args)
    if args.what == "search":
        return search(args, rest)
    apply_settings(args.swiglu, args.flat, args.mode)
    from tools.profile_step import main as profile_main
    return profile_main(rest)


if __name__ == "__main__":
    sys.exit(main())
