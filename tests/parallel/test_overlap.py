"""Communication overlapped with compute gives the same training as without it (issue 17).

Contract: on real gloo processes, ParallelEngine with parallel.overlap on (data-parallel buckets
all-reduced during the last backward of each model chunk, pipeline receives posted ahead) gets
bitwise the same reduced gradients, losses and weights after 2 steps as with overlap off, for
DP=2 in fp32 and with bf16 weights + fp32 main gradients (buckets reduced in place), and for
DP=2 x PP=2 interleaved (two chunks per rank armed separately, 4 micro-batches, tied embeddings,
a micro-batch without images); and that some buckets really were launched before backward ended.
Tensor parallelism: TP=2 + SP with async TP on gives the gradients of async TP off, and a training
step reads nothing back to the host; so does plain TP=2 with async TP (the input gradient's
all-reduce in flight while the weight gradient's GEMM runs). The step read is the one
`train.step_graph=on` captures on CUDA (the engine's step function, its learning rate a 0-d tensor,
the fused AdamW capturable): a host read there would break the capture. The same for DP=2 and for
PP=2's whole schedule (1F1B and interleaved): no host read, bitwise the eager step, one process's
loss and gradients to bf16 rounding.
"""
import dataclasses
import gc
import traceback
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipeline.config import DataConfig
from megaflow.config import Config, TrainConfig
from parallel.topology import ParallelConfig, Topology
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise
from tests.parallel.test_pp_dist import _config

ROWS = 8


def _engine(overlap: bool, pp: int, schedule: str, v: int, m: int, bf16: bool, one_process: bool = False,
            shard: bool = False, tie=None, full_state=None, tp: int = 1, fusion: str = "auto", moments: str = "fp32"):
    from parallel.engine import ParallelEngine
    from parallel.runtime import build_stages
    mcfg = _config(4, tie=pp > 1 if tie is None else tie)
    cfg = Config(model=mcfg, data=DataConfig(image_size=8, channels=1, patch_size=2),
                 train=TrainConfig(lr=2e-3, min_lr=2e-4, warmup=0, steps=4, grad_clip=1.0, weight_decay=0.1,
                                   dtype="bf16" if bf16 else "fp32", param_dtype="bf16" if bf16 else "fp32",
                                   moments_dtype=moments),
                 parallel=ParallelConfig(pp=pp, schedule=schedule, virtual_stages=v, micro_batches=m,
                                         overlap=overlap, dp_shard_optimizer=shard, tp=1 if one_process else tp,
                                         grad_accum_fusion=fusion))
    topo = Topology(pp=pp, tp=tp) if not one_process else Topology(rank=0, world_size=1)
    model, stages, tied = build_stages(cfg.model, cfg.parallel, topo, "cpu", 0, full_state, 48)
    engine = ParallelEngine(stages, cfg, torch.bfloat16 if bf16 else None, topo, tied, bucket_mb=0.004)
    return engine, topo


def _run(rank, world, pp, schedule, v, m, bf16):
    mcfg = _config(4, tie=pp > 1)
    batch = make_batch(mcfg, ROWS, 48)
    batch["tokens"][-1][batch["image_mask"][-1]] = 7  # the last row (a micro-batch of its own) has no image
    batch["image_mask"][-1] = batch["image_valid"][-1] = False
    noise = make_noise(mcfg, batch)
    out = {}
    for overlap in (False, True):
        engine, topo = _engine(overlap, pp, schedule, v, m, bf16)
        rows = slice(topo.dp_rank * ROWS // topo.dp, (topo.dp_rank + 1) * ROWS // topo.dp)
        early, losses, grads = [], [], None
        for step in range(2):
            losses.append(engine.train_step({k: t[rows] for k, t in batch.items()}, noise[rows], None, 1e-3)["loss"])
            early.append(engine.buckets.early)
            if step == 0:
                grads = [p.grad.clone() for p in engine.params]
        out[overlap] = dict(losses=losses, grads=grads, weights=engine.model_state_dict(), early=early,
                            buckets=len(engine.buckets.buckets),
                            in_place=sum(not b.copied for b in engine.buckets.buckets))
    off, on = out[False], out[True]
    assert on["losses"] == off["losses"], (on["losses"], off["losses"])
    for a, b in zip(on["grads"], off["grads"]):
        assert torch.equal(a, b)
    for k, w in off["weights"].items():
        assert torch.equal(on["weights"][k], w), k
    return dict(early=on["early"], early_off=off["early"], buckets=on["buckets"], in_place=on["in_place"])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-weights"])
def test_dp2_overlap_equals_no_overlap(bf16):
    for r in run_distributed(_run, 2, 1, "1f1b", 1, 2, bf16):
        assert r["buckets"] > 4, r
        assert r["early_off"] == [0, 0] and min(r["early"]) >= r["buckets"] // 2, r  # reduced during backward
        assert r["in_place"] == (r["buckets"] if bf16 else 0), r  # fp32 main gradients reduced where they live


def test_dp2_pp2_interleaved_overlap_equals_no_overlap():
    res = run_distributed(_run, 4, 2, "interleaved", 2, 4, True)
    for r in res:
        assert r["early_off"] == [0, 0] and min(r["early"]) > 0, r


def _flat_vs_torch_adamw(rank, world):
    mcfg = _config(4)
    batch = make_batch(mcfg, ROWS, 48)
    noise = make_noise(mcfg, batch)
    out = {}
    for flat in (False, True):
        engine, topo = _engine(True, 1, "1f1b", 1, 2, True)
        assert not engine.weights.flat_step  # the engine's default: only with the fused AdamW (CUDA)
        engine.weights.flat_step = flat  # as on CUDA, where the fused AdamW makes the engine choose it
        rows = slice(topo.dp_rank * ROWS // 2, (topo.dp_rank + 1) * ROWS // 2)
        # 2 steps: after them the two differ by fp32 rounding (~1e-7), which flips some bf16 weights' rounding,
        # so a third step's gradients would differ by more than the optimizers do
        for step in range(2):
            engine.train_step({k: t[rows] for k, t in batch.items()}, noise[rows], None, 1e-3 * (step + 1))
        out[flat] = dict(weights=engine.model_state_dict(), used=engine.weights._flat is not None,
                         bf16=engine.weights.flat_param.clone(), main=engine.weights.flat_main.clone())
    assert out[True]["used"] and not out[False]["used"]
    for k, w in out[False]["weights"].items():
        torch.testing.assert_close(out[True]["weights"][k], w, rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(out[True]["bf16"], out[True]["main"].to(torch.bfloat16))  # the kernel wrote the bf16 copy
    return True


def test_dp2_engine_steps_the_flat_adamw_like_torch_adamw():
    """The pipeline engine steps with MainWeights' flat one-pass AdamW (on CUDA, as PlainEngine does): with
    its fp32 main gradients written by the hooks (the step's first gradient copied, later micro-batches
    added, what no backward reached zeroed) and all-reduced in place during backward at DP=2, 2 steps
    (clipped, changing lr) give torch's AdamW's weights, and the bf16 weights are the main ones rounded."""
    assert all(run_distributed(_flat_vs_torch_adamw, 2))


def _as_captured(rank, world, pp=1, schedule="1f1b", v=1, m=2, tp=1, fusion="auto"):
    """One process, then this layout eagerly and as the graph captures it (the same initial weights: the
    one-process model's, loaded into the stages; a TP init draws per rank); `fusion`: the layout's
    parallel.grad_accum_fusion (the one process's stays unfused)."""
    mcfg = _config(4, tie=pp > 1)
    batch = make_batch(mcfg, ROWS, 48)
    noise = make_noise(mcfg, batch)
    out, alive, full = {}, [], None
    for layout in ("one", "eager", "captured"):
        one = layout == "one"
        engine, topo = (_engine(True, 1, "1f1b", 1, m, True, one_process=True, tie=pp > 1) if one else
                        _engine(True, pp, schedule, v, m, True, tp=tp,
                                full_state=full if pp > 1 or tp > 1 else None, fusion=fusion))
        if one:  # the one-process model's weights, in full precision, before any step
            full = {k: w.clone() for k, w in engine.model_state_dict().items()}
        alive.append(weakref.ref(engine.weights.model_params[0]))  # a bf16 weight the gradient hooks sit on
        for group in engine.optimizer.param_groups:  # as on CUDA: the fused AdamW's skip and clip stay on the device,
            group["fused"] = True                    # and the engine steps the flat kernel (the graph keeps it)
        engine.optimizer.defaults["fused"] = engine.weights.flat_step = True
        rows = slice(topo.dp_rank * ROWS // topo.dp, (topo.dp_rank + 1) * ROWS // topo.dp)
        part = ({k: t[rows] for k, t in batch.items()}, noise[rows], None)
        spy, losses, grads = _HostReads(), [], None
        for step in range(2):
            if step == 1:  # the first step's gradients (left in .grad by the step), by full-model name
                grads = _full_grads(engine)
            lr = 1e-3 * (step + 1)
            if layout != "captured":
                losses.append(engine.train_step(*part, lr)["loss"])
                continue
            for group in engine.optimizer.param_groups:  # what megaflow/step_graph.py's StepGraph sets
                group["capturable"] = True
            with spy:  # the step function the graph captures: its lr a 0-d tensor
                losses.append(engine._step(*part, torch.tensor(lr))["loss"])
        out[layout] = dict(losses=[float(x) for x in losses], weights=engine.model_state_dict(), reads=spy.reads,
                           fused=len(engine.weights.wgrad_fused),
                           grads=grads, flat=engine.weights._flat is not None,
                           copied=sum(b.copied for b in engine.buckets.buckets), early=engine.buckets.early,
                           world=engine.buckets.world, bf16=engine.weights.flat_param.clone(),
                           main=engine.weights.flat_main.clone())
        del engine
        gc.collect()
    # the engines are freed with their weights: the hooks hold them weakly (Python's gc does not look into a
    # tensor's hooks, so a hook that held its engine kept it, and each ParallelEngine of a bench run stayed on the GPU)
    assert [ref() for ref in alive] == [None] * 3
    one, eager, captured = out["one"], out["eager"], out["captured"]
    assert all(out[k]["flat"] for k in out)  # every layout stepped the flat one-pass AdamW
    assert torch.equal(captured["bf16"], captured["main"].to(torch.bfloat16))  # which wrote this rank's bf16 shards
    assert one["world"] == 1 and captured["world"] == world // (pp * tp), out
    if pp == 1 and tp == 1:  # data parallelism: in-place buckets, reduced during backward
        assert captured["copied"] == 0 and captured["early"] > 0, out
    if tp > 1:  # no data parallelism: no bucket reduces anything
        assert captured["early"] == 0, out
    assert captured["reads"] == [], captured["reads"]
    assert (captured["fused"] > 0) == (fusion == "on") and one["fused"] == 0, out
    assert captured["losses"] == eager["losses"], (captured["losses"], eager["losses"])
    for k, w in eager["weights"].items():
        assert torch.equal(captured["weights"][k], w), k
    # against one process on the whole batch: bf16 GEMMs over 4 rows vs 8 round differently, nothing else differs
    # (weights are not compared: AdamW turns a rounding-sized gradient of either sign into a whole +-lr step)
    torch.testing.assert_close(captured["losses"], one["losses"], rtol=1e-4, atol=0)
    # the step's DP-summed (TP: gathered) fp32 gradients: the whole and each tensor within 2% and 3% (a reduction
    # that lost or doubled a rank's share would be off by ~50-100%)
    assert set(captured["grads"]) <= set(one["grads"]) | {"lm_head.weight"}, set(captured["grads"]) - set(one["grads"])
    names = [n for n in captured["grads"] if n in one["grads"]]
    assert len(names) >= len(one["grads"]) // (2 * pp), names
    diff = [(captured["grads"][n] - one["grads"][n]).norm() for n in names]
    norm = [one["grads"][n].norm() for n in names]
    assert torch.stack(diff).norm() <= 2e-2 * torch.stack(norm).norm(), (torch.stack(diff).norm(), torch.stack(norm).norm())
    assert all(d <= 3e-2 * n + 1e-7 for d, n in zip(diff, norm)), max(float(d / n) for d, n in zip(diff, norm) if n > 0)
    return True


def _full_grads(engine) -> dict:
    """{full-model name: fp32 main gradient, whole (TP shards gathered, parallel/checkpoint_tp.py)} of this rank's
    stages (a pipeline rank holds some of the one process's parameters)."""
    from parallel.checkpoint_tp import gather_full
    out = {}
    for st in engine.stages:
        out.update(gather_full(st.module, {n: engine.weights.main_of(p).grad.clone()
                                           for n, p in st.module.named_parameters() if p.requires_grad}))
    return out


def test_dp2_step_as_the_graph_captures_it_reads_nothing_back_and_equals_one_process():
    """train.step_graph=on graphs data-parallel layouts (megaflow/step_graph.py): the step function it captures,
    run eagerly at DP=2 over gloo (bf16 weights: every bucket a slice of the flat fp32 gradient buffer, reduced
    in place during backward; 2 micro-batches; the flat AdamW with the lr a 0-d tensor and capturable groups),
    reads no tensor value back to the host (a read there breaks the capture), equals the eager step bitwise
    (losses, weights after 2 steps) and equals one process on the whole batch (to bf16 GEMM rounding). And an
    engine, once dropped, is freed with its weights (its gradient hooks hold it weakly)."""
    assert all(run_distributed(_as_captured, 2))


@pytest.mark.parametrize("schedule,v,fusion", [("1f1b", 1, "off"), ("interleaved", 2, "on")])
def test_pp2_schedule_as_the_graph_captures_it_reads_nothing_back_and_equals_one_process(schedule, v, fusion):
    """train.step_graph=on graphs pipelines (megaflow/step_graph.py): each rank's whole schedule as one graph. The
    step function it captures, run eagerly at PP=2 over gloo (4 micro-batches, receives posted ahead, bf16 weights
    with fp32 main gradients flushed after each backward, embeddings tied across the stages, the flat AdamW with
    the lr a 0-d tensor and capturable groups), reads no tensor value back to the host, equals the eager step
    bitwise and one process on the same weights and batch (to bf16 GEMM rounding). The interleaved case runs
    with gradient-accumulation fusion (parallel/wgrad_fusion.py: each linear's weight gradient added into its fp32
    main gradient by its GEMM, no flush), against the unfused one process."""
    assert all(run_distributed(_as_captured, 2, 2, schedule, v, 4, 1, fusion))


def test_tp2_step_as_the_graph_captures_it_steps_the_flat_adamw_and_equals_one_process():
    """train.step_graph=on at TP=2 (no data parallelism) steps the flat one-pass AdamW over each rank's own shards,
    as the graphed one GPU and DP do (TP-only graphs stepped torch's fused AdamW until session 9): the step function
    the graph captures, over gloo, reads nothing back to the host, equals the eager TP2 step bitwise and one
    process on the same weights and batch (bf16 GEMM rounding; the sharded gradients gathered)."""
    assert all(run_distributed(_as_captured, 2, 1, "1f1b", 1, 2, 2))


# ----- tensor parallelism: async TP and host read-backs ----------------------------------------------------
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}


class _HostReads(TorchDispatchMode):
    """Counts operators that read a tensor's values on the host (on CUDA each is a blocking copy:
    the host waits for the GPU) with where they came from."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[-8:-1]]
            self.reads.append((func.overloadpacket.__name__, where))
        return func(*args, **(kwargs or {}))


class _BackwardInFlight(TorchDispatchMode):
    """The most all-reduces the backward has launched and not yet waited for at once (functional collectives:
    all_reduce's output is what wait_tensor takes)."""

    def __init__(self):
        super().__init__()
        self.open, self.most = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch._C._current_graph_task_id() != -1:  # inside a backward
            name = func.overloadpacket.__name__
            if name == "all_reduce":
                self.open.append(out)
                self.most = max(self.most, len(self.open))
            elif name == "wait_tensor":
                self.open = [t for t in self.open if t is not args[0]]
        return out


ROWS_TP = 4


def _tp2_sp(rank, world, sp: bool):
    import torch.distributed as dist
    from parallel.comm import symm_all_reduce  # noqa: F401  (registers megaflow::symm_all_reduce)
    from parallel.runtime import build_engine, build_stages
    from tests.parallel.test_tp import reference
    x = torch.arange(6.0) * (rank + 1)  # parallel.tp_all_reduce=symm's op; on CPU its NCCL/gloo fallback
    assert torch.equal(torch.ops.megaflow.symm_all_reduce(x, dist.group.WORLD.group_name), torch.arange(6.0) * 3)
    mcfg, ref = reference()
    batch = make_batch(mcfg, ROWS_TP, 48)
    noise = make_noise(mcfg, batch)
    import parallel.layers as layers
    launches, start_reduce = [], layers.start_reduce  # parallel.tp_overlap's deferred row-parallel reductions
    layers.start_reduce = lambda *a: launches.append(a[0].shape[0]) or start_reduce(*a)
    out = {}
    # off; async TP; row chunks (parallel.tp_overlap: 4 with async TP's dX all-reduce without SP, halves alone under SP)
    chunks = 2 if sp else 4
    for key, async_tp, halves in ((False, False, 0), (True, True, 0), ("halves", not sp, chunks)):
        cfg = Config(model=mcfg, data=DataConfig(image_size=8, channels=1, patch_size=2),
                     train=TrainConfig(lr=1e-3, warmup=0, steps=4, grad_clip=1.0, compile="off"),
                     parallel=ParallelConfig(tp=2, sequence_parallel=sp, async_tp=async_tp, tp_overlap=halves))
        topo = Topology(tp=2)
        model, stages, tied = build_stages(mcfg, cfg.parallel, topo, "cpu", 0, full_state=ref.state_dict(), seq_len=48)
        engine = build_engine(cfg, model, stages, tied, topo, None)
        for group in engine.optimizer.param_groups:  # the fused AdamW, as on CUDA: its skip and clip stay on the device
            group["fused"] = True
        engine.optimizer.defaults["fused"] = True
        in_flight = _BackwardInFlight()
        with in_flight:
            first = engine.train_step(batch, noise, None, 1e-3)
        grads = [p.grad.clone() for p in engine.params]
        for group in engine.optimizer.param_groups:  # the second step as train.step_graph=on captures it
            group["capturable"] = True               # (megaflow/step_graph.py): lr a 0-d tensor, nothing read
        spy = _HostReads()
        with spy:
            second = engine._step(batch, noise, None, torch.tensor(1e-3))
        out[key] = dict(losses=[float(first["loss"]), float(second["loss"])], grads=grads, reads=spy.reads,
                        tensors=all(torch.is_tensor(v) for v in second.values()), launches=launches[:],
                        in_flight=in_flight.most,
                        comms={m.input_comm for m in model.modules() if type(m).__name__ == "ColumnParallelLinear"})
        launches.clear()
    layers.start_reduce = start_reduce
    off, on, halves = out[False], out[True], out["halves"]
    comm = "gather" if sp else "copy_async"
    assert comm in on["comms"] and comm not in off["comms"], (on["comms"], off["comms"])
    # chunks: each of the 6 blocks' o_proj and down_proj reduced once per chunk of 4 / chunks rows, 2 forwards
    assert off["launches"] == on["launches"] == [], (off["launches"], on["launches"])
    assert halves["launches"] == [ROWS_TP // chunks] * 12 * chunks * 2, halves["launches"]
    # backward: without SP the chunks' input-gradient all-reduces are all in flight before the first is waited
    # for (parallel.tp_overlap.enter_chunks); the plain and async TP backward wait for each before the next
    assert (off["in_flight"], on["in_flight"], halves["in_flight"]) == (1, 1, 1 if sp else chunks), \
        (off["in_flight"], on["in_flight"], halves["in_flight"])
    for other in (on, halves):
        for a, b in zip(other["grads"], off["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    return dict(on=on["losses"], halves=halves["losses"], off=off["losses"], tensors=on["tensors"] and halves["tensors"],
                reads=on["reads"] + off["reads"] + halves["reads"])


@pytest.mark.parametrize("sp", [True, False], ids=["tp2sp", "tp2"])
def test_tp2_sp_async_equals_sync_and_reads_nothing_back(sp):
    """TP=2 (+ SP) through the ParallelEngine: with parallel.async_tp (under SP each all-gather and
    reduce-scatter overlapped with its GEMM; without, each column-parallel layer's input-gradient
    all-reduce with its weight-gradient GEMM: parallel/async_tp.py) the gradients and losses equal the
    plain collectives'; so do they with parallel.tp_overlap (each block's attention and MLP on row chunks of
    the batch, one chunk's row-parallel reduction in flight during the next ones' compute: parallel/tp_overlap.py;
    4 chunks with async TP, halves under SP), which really launches every such reduction once per chunk; and a whole training step (forward, backward, clip, fused AdamW) reads no
    tensor value back to the host: the engine returns 0-d tensors, read only at log steps (on 2 H200s
    a TP=2 step spent 21 ms of host time in blocking copies, docs/benchmarks.md)."""
    for r in run_distributed(_tp2_sp, 2, sp):
        assert r["tensors"], r
        assert r["reads"] == [], r["reads"]
        for a, b, c in zip(r["on"], r["halves"], r["off"]):
            assert abs(a - c) < 1e-5 * max(1.0, abs(c)) and abs(b - c) < 1e-5 * max(1.0, abs(c)), r


# ----- data parallelism: the fp32 accumulation hooks ---------------------------------------------------------
@pytest.mark.parametrize("deferred", [False, True])
def test_main_gradients_written_then_added_equal_zero_then_add(deferred):
    """The pipeline engine's fp32 main gradients (megaflow/optim.py MainWeights, flat_grads=False) are
    written by a parameter's first gradient of the step and added to by later ones, instead of zeroing
    the whole buffer first (one pass over the fp32 gradients less): the sum is bitwise that of zero +
    every gradient, and `settle_grads` zeros a gradient no backward reached this step (its slice
    still holds the last step's). Deferred (what the pipeline does outside a data-parallel bucket's
    backward): the hooks keep the gradients and one `flush_grads` per backward moves them, bitwise the same."""
    from megaflow.optim import MainWeights, param_groups
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    weights = MainWeights(model, param_groups(model, 0.0), TrainConfig(), torch.bfloat16, flat_grads=False)
    weights.defer = deferred
    xs = [torch.randn(4, 8, dtype=torch.bfloat16) for _ in range(2)]

    def step(layers: int) -> list:
        """Two backward passes through the first `layers` layers; the expected fp32 sums, from autograd."""
        weights.zero_grad()
        params = [p for layer in model[:layers] for p in layer.parameters()]
        want = [torch.zeros(p.shape) for p in params]
        for x in xs:
            loss = model[:layers](x).float().pow(2).sum()
            for w, g in zip(want, torch.autograd.grad(loss, params, retain_graph=True)):
                w.add_(g)  # 0 + g1 + g2 in fp32, as the old zero-then-add hooks summed
            loss.backward()
            assert all((p.grad is not None) == deferred for p in params)  # kept for the flush, or moved by the hooks
            if deferred:
                weights.flush_grads()
                assert all(p.grad is None for p in params)
        return want

    want = step(3)
    weights.settle_grads()
    for p, w in zip(model.parameters(), want):
        assert torch.equal(weights.main_of(p).grad, w)
    want = step(2)  # the last layer gets no gradient this step
    last = [weights.main_of(p).grad for p in model[2].parameters()]
    assert all(g.abs().sum() > 0 for g in last)  # last step's values, until settled
    weights.settle_grads()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in last)
    for p, w in zip([p for layer in model[:2] for p in layer.parameters()], want):
        assert torch.equal(weights.main_of(p).grad, w)


def test_last_bucket_holds_only_the_first_parameters():
    """parallel.last_bucket_mb: buckets fill in reverse model order (the order backward makes gradients ready),
    and with last_mb the LAST bucket holds only the model's first parameters (ready last), at most last_mb MiB, so
    the all-reduce left after backward is short; every bucket stays a slice of the flat gradient buffer. Without
    it the layout is the plain reverse fill (the last bucket whatever is left, here 4 of 6 parameters)."""
    from parallel.data_parallel import GradBuckets
    sizes = [1, 1, 2, 4, 4, 4]  # x 2**16 fp32 elements = 0.25 MiB each
    flat = torch.zeros(sum(sizes) * 2 ** 16)
    params, off = [], 0
    for n in sizes:
        p = torch.zeros(n * 2 ** 16, requires_grad=True)
        p.grad = flat[off:off + n * 2 ** 16]
        params.append(p)
        off += n * 2 ** 16
    index = {id(p): i for i, p in enumerate(params)}

    def layout(**kw):
        buckets = GradBuckets(params, None, bucket_mb=2.0, **kw).buckets
        assert all(not b.copied for b in buckets)
        return [sorted(index[id(p)] for p in b.params) for b in buckets]

    assert layout() == [[4, 5], [0, 1, 2, 3]]  # 2 MiB each: 1 + 1, then 1 + 0.5 + 0.25 + 0.25
    assert layout(last_mb=1.0) == [[4, 5], [3], [0, 1, 2]]  # the first 1 MiB of the model (0.25 + 0.25 + 0.5) last
    assert layout(last_mb=0.3) == [[4, 5], [1, 2, 3], [0]]
    assert layout(last_mb=0.1) == layout()  # the first parameter alone is larger: no smaller bucket


def _compiled_chunk_order(rank, world):
    import re
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code
    from megaflow.model.layers import AttnContext, TransformerBlock
    from parallel.backend import get_backend
    from parallel.tensor_parallel import parallelize_block
    from parallel.tp_overlap import raise_collectives
    raise_collectives()  # what apply_tp does
    out = []
    for chunks in (2, 0):  # parallel.tp_overlap: 2, and off
        torch.manual_seed(0)
        block = TransformerBlock(64, 4, 4, 16, 128)
        parallelize_block(block, dist.group.WORLD, False, get_backend("local"), chunks)
        x = torch.randn(4, 16, 64, requires_grad=True)  # (B, T, D)
        ctx = AttnContext(torch.ones(1, 1, 16, 16), torch.zeros(1, 1, 16, 16))
        torch._dynamo.reset()
        _, codes = run_and_get_code(torch.compile(lambda x: block(x, ctx).sum().backward()), x)
        out.append([[m.group(1) for m in re.finditer(r"\b(all_reduce_|wait_tensor|extern_kernels\.mm)\b", code)]
                    for code in codes])  # forward, backward
    return out


def _overlapped(ops: list) -> int:
    """How many all-reduces of a generated graph have a GEMM between their launch and their wait."""
    starts = [i for i, op in enumerate(ops) if op == "all_reduce_"]
    return sum("extern_kernels.mm" in ops[i:ops.index("wait_tensor", i)] for i in starts)


def test_compiled_tp_launches_each_reduction_before_other_gemms():
    """TP=2 blocks compiled by inductor (CPU, gloo) with tp_overlap.raise_collectives (apply_tp sets it).
    parallel.tp_overlap=2: in the forward each half's row-parallel all-reduce is launched before the other
    half's GEMMs, and in the backward each half's input-gradient all-reduce before the other half's GEMMs
    (without the passes AOTAutograd's backward computed both halves' GEMMs, then launched both all-reduces:
    nothing to overlap). Plain TP2: the backward's input-gradient all-reduce of the attention runs beside the
    weight-gradient GEMMs (without: launched after them and waited at once)."""
    for (forward, backward), (_, plain_backward) in run_distributed(_compiled_chunk_order, 2):
        assert backward.count("all_reduce_") == 4 and forward.count("all_reduce_") == 4, (forward, backward)
        assert _overlapped(forward) >= 2 and _overlapped(backward) >= 2, (forward, backward)
        assert plain_backward.count("all_reduce_") == 2 and _overlapped(plain_backward) >= 1, plain_backward
