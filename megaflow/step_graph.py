"""A whole training step as one CUDA graph (`train.step_graph: on`): forward, backward, the fp32
gradient cast, clipping and the fused AdamW, replayed with one launch.

Why: a step of the TarFlow-only model at ml-tarflow's ImageNet-64 shape launches about 2,000
kernels; the host cannot stay far enough ahead of them, and the gaps between kernels left the GPU
idle for ~6% of the step (docs/benchmarks.md, "TarFlow at ml-tarflow's shape"). A graph has no gaps
and no host work per kernel.

How: the engine's own step function runs eagerly for `warmup` steps (its compiled regions compile,
the optimizer creates its state), then one step is captured into a CUDA graph on static copies of
its inputs and replayed; every later step copies its batch, noise, condition mask and learning rate
into those copies and replays the graph. Every call is a real training step, the warm-up ones too.
AdamW is MainWeights' flat one-pass kernel (megaflow/flat_adamw.py), or torch's fused AdamW with
`capturable=True` where the flat step does not apply; either takes its learning rate as a device
tensor and keeps its step counts and skip flag on the device, so nothing in the graph depends on a
host value (a host read inside the step fails the capture: tools/device/graph_probe.py finds which).

`train.step_graph: auto` graphs the step wherever `on` would and runs it without a graph elsewhere (a
CPU run, ZeRO...), logging the reason once: the setting a config can keep for every layout.
Contract (checked by `check_step_graph`): CUDA; one process (PlainEngine) or any layout of ParallelEngine:
tensor parallelism (with or without sequence parallelism), data parallelism, pipeline parallelism (1F1B or
interleaved), and their products; not with `train.compile_mode=reduce-overhead` (graphs inside a graph); batches of
one shape: a batch of another shape runs eagerly, with a warning once, on memory held beside the graph's.
The graph holds the step's NCCL collectives: under TP the TP group's (functional ones in the model, the
gradient norm's all-reduce); under DP the loss counts' and totals' all-reduces and the gradient buckets'
(parallel/data_parallel.py: fp32, in place in the flat main-gradient buffer, launched from gradient hooks
as buckets fill, on NCCL's stream, so in the graph they run beside the rest of the backward; `finish`'s
waits join that stream back, a stream-to-stream wait, not a host one). Every rank runs the same step
code and launches its buckets strictly in order, so every rank captures the same collectives in the same
order (under `parallel.dp_shard_optimizer` the buckets' reduce-scatters and, after each shard's AdamW, the bf16
weights' all-gathers: parallel/dist_optimizer.py), and the eager warm-up steps have made the NCCL communicators before the capture (torch's NCCL
watchdog queries its events in thread-local capture mode, so it does not break a capture).
Under pipeline parallelism each rank captures its WHOLE schedule (parallel/pipeline_step.py): every
micro-batch's forward and backward of its stages, the activation and gradient sends and receives (NCCL
point-to-point, one `batch_isend_irecv` a message on the link's own group, receives posted one action
ahead as in the eager step: the second eager warm-up step already posts them so), the tied embeddings'
and the loss totals' collectives, the gradient norm's all-reduce over the pipeline, clip and AdamW. Both
ranks of a link capture its messages in the schedule's send order (parallel/schedules.py checks it),
every link's channel was connected at construction (pipeline_comm._warm_up), and a capture launches
nothing, so capturing cannot deadlock; a replay runs the same kernels in the same per-stream order as the
eager step, whose order 1F1B and the interleaved schedule make deadlock-free. On 2 H200s (h200_1b, 32 rows,
8 micro-batches) the graphed PP2 step ran 241.4 ms against 279.4 eager, the same losses (docs/benchmarks.md).
Refused, each with a ValueError naming the setting: data-parallel buckets that copy gradients (fp32
weights, `train.param_dtype=fp32`: flags and copies read on the host) and PlainEngine's data-parallel path
(a reduction after backward, made anew each step); ZeRO
(DeepSpeed's step), Transformer Engine layers (and their FP8), and the symmetric-memory routes of TP
(`parallel.tp_all_reduce=symm`, `parallel.async_tp` under sequence parallelism): their buffers and barriers
are made and signalled outside NCCL; on 2 H200s (torch 2.11) the graphed TP2 step with `tp_all_reduce=symm`
(its buffers made in the eager warm-up steps) never finished its row (docs/benchmarks.md, TP round 5). `parallel.async_tp` without
sequence parallelism (`copy_linear`: a functional NCCL all-reduce in flight during a GEMM) is captured
like the others. Micro-batches are captured as they run: the hooks arm the buckets during the last
backward of each step, the same in every step.
FlexAttention runs eagerly only on the CPU, which is refused anyway. The returned
losses and metrics are copies, so the values of earlier steps are not overwritten by later replays.
Peak memory: the graph's activations live in a private pool made at capture, which
`torch.cuda.max_memory_allocated` over later steps does not see; read `max_memory_reserved`.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("megaflow")

STEP_GRAPH_MODES = ("off", "on", "auto")


def check_step_graph(mode: str, device: torch.device, compile_mode: str = "default", data_parallel: bool = False,
                     parallel=None, copied_buckets: bool = False, dp: int = 1) -> bool:
    """Whether to graph the step. 'on': a ValueError naming the setting when it cannot be done; 'auto':
    graph where 'on' would and the layout has run graphed on GPUs, else run without a graph and log why
    once. `parallel`: the run's ParallelConfig when a multi-process engine asks (None: one process), `dp`
    its data-parallel degree; `data_parallel`: PlainEngine's data-parallel path (not graphed);
    `copied_buckets`: ParallelEngine's gradient buckets copy gradients."""
    if mode not in STEP_GRAPH_MODES:
        raise ValueError(f"train.step_graph={mode!r} must be one of {STEP_GRAPH_MODES}")
    if mode == "off":
        return False
    try:
        _check_run(device, compile_mode, data_parallel, parallel, copied_buckets)
    except ValueError as e:
        if mode == "on":
            raise
        log.info("train.step_graph=auto: the step runs without a CUDA graph here (%s)", _auto_reason(str(e)))
        return False
    if mode == "auto" and parallel is not None and parallel.pp > 1 and (parallel.tp > 1 or dp > 1):
        # a pipeline is graphed by 'auto' alone (PP2 measured on 2 H200s); with TP or DP it passes the CPU tests
        # of the captured step but has never replayed on GPUs, where a capture that stalls stalls the whole job
        log.info("train.step_graph=auto: the step runs without a CUDA graph here (a pipeline with tp=%d, dp=%d has "
                 "not run graphed on GPUs yet; to graph it set train.step_graph=on)", parallel.tp, dp)
        return False
    return True


def _auto_reason(refusal: str) -> str:
    """A refusal of 'on' as 'auto' logs it: without its advice to turn the graph off (auto already
    did), with the other setting that would graph the step when the refusal names one."""
    why, _, advice = refusal.partition("; set ")
    other = advice.split(" or ", 1)[1] if " or " in advice else ""
    return f"{why}; to graph it set {other}" if other else why


def _check_run(device: torch.device, compile_mode: str, data_parallel: bool, parallel, copied_buckets: bool) -> None:
    """What a graphed step cannot hold on this run (see the file docstring)."""
    if device.type != "cuda":
        raise ValueError(f"train.step_graph=on needs a CUDA device (this run is on {device.type}); set train.step_graph=off")
    if compile_mode == "reduce-overhead":
        raise ValueError("train.step_graph=on already graphs the whole step; use it with train.compile_mode=default, "
                         "not reduce-overhead (CUDA graphs of the compiled regions)")
    if data_parallel:
        raise ValueError("train.step_graph=on graphs data parallelism through the parallel engine (megaflow train "
                         "under torchrun), not the one-process engine's after-backward reduction; set "
                         "train.step_graph=off here")
    if copied_buckets:
        raise ValueError("train.step_graph=on graphs data-parallel gradient buckets that are slices of the flat fp32 "
                         "main-gradient buffer (bf16 weights); this run's copy gradients (fp32 weights, train.param_dtype="
                         "fp32) and read flags on the host; set train.step_graph=off or train.param_dtype=bf16")
    if parallel is not None:
        _check_layout(parallel)


def _check_layout(p) -> None:
    """What a graphed multi-process step cannot hold (see the file docstring)."""
    off = "; set train.step_graph=off"
    if p.zero_stage:
        raise ValueError(f"train.step_graph=on does not graph DeepSpeed's ZeRO step (parallel.zero_stage="
                         f"{p.zero_stage}){off} or parallel.zero_stage=0")
    if p.backend != "local":
        raise ValueError(f"train.step_graph=on graphs the local layers only (parallel.backend={p.backend!r}: "
                         f"Transformer Engine's layers and FP8 recipes are not captured here){off}")
    if p.tp_all_reduce == "symm":
        raise ValueError(f"train.step_graph=on does not capture parallel.tp_all_reduce='symm' (on 2 H200s, torch 2.11, "
                         f"the graphed TP2 step with it never finished: symmetric-memory barriers outside NCCL; "
                         f"docs/benchmarks.md){off} or tp_all_reduce=nccl")
    if p.async_tp and p.sequence_parallel:
        raise ValueError(f"train.step_graph=on does not capture parallel.async_tp=true under sequence_parallel "
                         f"(symmetric-memory all-gather / reduce-scatter GEMMs, not verified under capture){off} "
                         f"or async_tp=false")


def _signature(batch: dict, *tensors) -> tuple:
    """What a captured graph is specific to: every tensor's shape, dtype and device."""
    def sig(v):
        return (tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else repr(v)
    return tuple((k, sig(v)) for k, v in sorted(batch.items())) + tuple(sig(t) for t in tensors)


def _copy(x):
    """A copy of a tensor, of the tensors of a dict; anything else as it is (None: no noise, say)."""
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    return x.clone() if torch.is_tensor(x) else x


class StepGraph:
    """`step(batch, noise, keep, lr) -> dict of 0-d tensors`, run as one CUDA graph after `warmup` eager calls."""

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, device: torch.device, warmup: int = 2):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.lr = torch.zeros((), dtype=torch.float32, device=device)  # the learning rate the graph reads
        self.calls, self.graph, self.key, self.inputs, self.outputs, self.warned = 0, None, None, None, None, False

    def __call__(self, batch: dict, noise: torch.Tensor, keep: torch.Tensor, lr: float) -> dict:
        for group in self.optimizer.param_groups:  # here, not once: loading an optim.pt resets them
            group["capturable"] = True
        self.lr.fill_(lr)
        key = _signature(batch, noise, keep)
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            return self._side_stream(batch, noise, keep)
        if self.graph is None:
            self._capture(batch, noise, keep, key)
        elif key != self.key:
            if not self.warned:
                log.warning("train.step_graph: a batch of another shape than the captured one runs eagerly")
                self.warned = True
            return self.step(batch, noise, keep, self.lr)
        else:
            static_batch, *static = self.inputs
            for dst, src in [(static_batch[k], v) for k, v in batch.items()] + list(zip(static, (noise, keep))):
                if torch.is_tensor(src):
                    dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return _copy(self.outputs)

    def _side_stream(self, batch, noise, keep) -> dict:
        """An eager step on a side stream, as CUDA graph warm-up wants (torch.cuda.graphs' notes)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(batch, noise, keep, self.lr)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, batch, noise, keep, key) -> None:
        self.key = key
        self.inputs = (_copy(batch), *(_copy(t) for t in (noise, keep)))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back, so the graph's pool has room
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call of another thread of this process (data.prefetch's thread pins the
            # next batch, and its host allocator queries events) must not invalidate the capture; in the
            # default global mode it did, on the H200 with real data (docs/benchmarks.md, round 9)
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs, self.lr)
        except Exception as e:  # nothing ran: a capture records the step, it does not execute it
            raise RuntimeError(f"train.step_graph=on: this step could not be captured as a CUDA graph "
                               f"({type(e).__name__}: {str(e)[:200]}); set train.step_graph=off") from e
        log.info("train.step_graph: the training step is captured as one CUDA graph")
