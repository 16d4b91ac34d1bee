"""Pipeline parallelism without processes: schedules, layouts, stage split, micro-batching.

Contracts:
- every schedule we hand out finishes (simulated), receives each link's messages in send order
  (what NCCL needs), and its simulated bubble equals theory;
- the FLOP-balanced layout is optimal and a manual layout is honoured; unworkable layouts fail
  with an error that names the offending value;
- the stages' parameters partition the model's, keeping the full model's names;
- running the stage views one after another equals the unsplit model; one process with
  micro-batches (global-count normalisation) equals one big batch, loss and gradients.
"""
import itertools
import re

import pytest
import torch

from megaflow.model.starflow import STARFlow2, apply_stage, build_model, read_metrics
from parallel.pipeline import (balance_layout, choose_layout, init_stages, load_stages, split_stages,
                               stage_costs)
from parallel.pipeline_step import PipelineSchedule, split_batch
from parallel.schedules import check_link_order, rank_actions, simulate, theory_bubble
from parallel.topology import Topology
from tests.helpers import make_batch, make_noise, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: threads only add synchronisation (and stall badly on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pp,v", [(2, 1), (3, 1), (4, 1), (2, 2), (2, 3), (4, 2), (3, 2)])
def test_schedules_finish_in_order_and_match_theory(pp, v):
    schedule = "1f1b" if v == 1 else "interleaved"
    for m in ([1, 2, 3, 5, 8] if v == 1 else [pp, 2 * pp, 4 * pp]):
        r = simulate(schedule, pp, m, v)  # raises on deadlock
        check_link_order(schedule, pp, m, v)
        assert r["bubble"] == pytest.approx(theory_bubble(pp, m, v), abs=1e-9)
        for rank in range(pp):  # every (chunk, micro-batch) forward and backward exactly once
            acts = rank_actions(schedule, pp, rank, m, v)
            want = {(k, c, i) for k in "FB" for c in range(v) for i in range(m)}
            assert sorted((a.kind, a.chunk, a.micro_batch) for a in acts) == sorted(want)


def test_balance_is_optimal_and_weights_ends():
    for n, s in [(8, 2), (8, 3), (7, 4), (5, 5)]:
        for first, last in [(0.0, 0.0), (2.5, 0.0), (0.0, 3.0), (1.5, 1.5)]:
            layout = balance_layout(n, s, 1.0, first, last)
            assert sum(layout) == n and min(layout) >= 1 and len(layout) == s

            def worst(lay):
                return max(c + (first if i == 0 else 0) + (last if i == s - 1 else 0) for i, c in enumerate(lay))
            best = min(worst(c) for c in itertools.product(range(1, n + 1), repeat=s) if sum(c) == n)
            assert worst(layout) == pytest.approx(best)
    assert balance_layout(8, 2, 1.0, 2.0, 0.0) == [3, 5]  # the embedding side takes fewer units


def test_costs_count_vlm_and_flow_layers_differently():
    cfg = tiny_config(n_layers=4)
    unit, first, last = stage_costs(cfg, 48)
    flow_only = stage_costs(tiny_config(tarflow_only=True, n_layers=4), 48)[0]
    assert unit > 2 * flow_only  # a unit holds r=2 VLM layers besides its flow layer
    assert first > 0 and last > 0


@pytest.mark.parametrize("kw,needle", [
    (dict(pp=4, virtual_stages=2, schedule="interleaved", micro_batches=4), "8 pipeline stages but the model has only 4"),
    (dict(pp=2, stage_layout="1,2"), "covers 3 Pretzel units but the model has 4"),
    (dict(pp=2, stage_layout="3,2"), "covers 5 Pretzel units"),
    (dict(pp=2, stage_layout="4,0"), "at least one Pretzel unit"),
    (dict(pp=2, stage_layout="2,1,1"), "gives 3 stages but pp * virtual_stages = 2"),
    (dict(pp=2, stage_layout="2;2"), "comma-separated"),
    (dict(pp=2, virtual_stages=2, schedule="interleaved", micro_batches=3), "micro_batches=3 must be a multiple of"),
    (dict(pp=2, virtual_stages=2, schedule="1f1b"), "virtual_stages=2 needs parallel.schedule='interleaved'"),
    (dict(pp=1, virtual_stages=2, schedule="interleaved"), "needs parallel.pp >= 2"),
])
def test_unworkable_layouts_name_the_value(kw, needle):
    with torch.device("meta"):
        model = STARFlow2(tiny_config(n_layers=4))
    with pytest.raises(ValueError, match=re.escape(needle)):
        split_stages(model, pp_rank=0, verbose=False, **kw)


def test_micro_batches_must_divide_the_batch():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="batch size 4 .* not divisible by parallel.micro_batches=3"):
        split_batch(make_batch(cfg, 4, 48), 3)


def test_stages_partition_the_parameters_with_full_names():
    cfg = tiny_config(n_layers=4)
    with torch.device("meta"):
        model = STARFlow2(cfg)
    full = sorted(k for k, _ in model.named_parameters())
    for pp, v, layout in [(2, 1, ""), (4, 1, ""), (2, 2, ""), (2, 1, "1,3")]:
        sched = "interleaved" if v > 1 else "1f1b"
        stages = [s for r in range(pp) for s in split_stages(model, pp, r, sched, v, pp, layout, verbose=False)]
        names = [k for s in stages for k, _ in s.module.named_parameters()]
        assert sorted(names) == full, (pp, v)
        assert [s.index for s in sorted(stages, key=lambda s: s.index)] == list(range(pp * v))
        if layout:
            assert [len(s.unit_keys) for s in stages] == [1, 3]
    assert len(full) == len(list(model.parameters()))


def test_chained_stage_views_equal_the_model():
    """Stage views run one after another in one process give the unsplit loss (the cut is right)."""
    cfg = tiny_config(n_layers=4)
    model = build_model(cfg)
    batch = make_batch(cfg, 2, 48)
    noise = make_noise(cfg, batch)
    want, _ = model(batch, noise)
    stages = sorted((s for r in range(4) for s in split_stages(model, 4, r, verbose=False)), key=lambda s: s.index)
    ctx = stages[0].module.context(batch)
    state = None
    for st in stages:
        state = st.forward(batch, ctx, state, noise)
    last = stages[-1].module
    got = last.combine(last.loss_terms(state, batch), last.loss_counts(batch))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_micro_batching_equals_one_batch():
    """PP=1 with 4 micro-batches and global counts: same loss and gradients as one batch; a
    forward-only step gives the same loss and leaves the gradients alone."""
    cfg = tiny_config()
    ref = build_model(cfg)
    batch = make_batch(cfg, 4, 48)
    noise = make_noise(cfg, batch)
    loss, metrics = ref(batch, noise)
    loss.backward()
    with torch.device("meta"):
        model = STARFlow2(cfg)
    apply_stage(model, cfg.stage)
    stages = split_stages(model, 1, 0, micro_batches=4, verbose=False)
    load_stages(stages, ref.state_dict())
    sched = PipelineSchedule(stages, Topology(), micro_batches=4)
    got, got_metrics = sched.step(batch, noise)
    torch.testing.assert_close(got, loss.detach(), rtol=0, atol=1e-6)
    grads_before = [p.grad.clone() for p in stages[0].module.parameters() if p.grad is not None]
    evaluated, _ = sched.step(batch, noise, forward_only=True)  # evaluation: same loss, no gradient
    torch.testing.assert_close(evaluated, got, rtol=0, atol=0)
    for g, p in zip(grads_before, [p for p in stages[0].module.parameters() if p.grad is not None]):
        assert torch.equal(g, p.grad)
    assert all(torch.is_tensor(v) for v in got_metrics.values())  # nothing read back during the step
    got_metrics = read_metrics(got_metrics)
    assert got_metrics.keys() == metrics.keys()
    for k, v in metrics.items():
        assert abs(got_metrics[k] - float(v)) <= 1e-6 * max(1.0, abs(float(v))), (k, got_metrics[k], v)
    grads = dict(stages[0].module.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=0, atol=1e-6, msg=name)


def test_init_stages_materialises_only_owned_parameters():
    cfg = tiny_config(n_layers=4)
    with torch.device("meta"):
        model = STARFlow2(cfg)
    stages = split_stages(model, 2, 1, verbose=False)
    init_stages(model, stages, "cpu", seed=0)
    own = dict(stages[0].module.named_parameters())
    assert all(not p.is_meta and torch.isfinite(p).all() for p in own.values())
    assert float(own["gauss_head.weight"].detach().abs().sum()) == 0.0  # zero-init kept
    assert model.units["0"].flow_layer.mlp.gate_up.weight.is_meta  # not ours: never allocated
    assert model.embed_tokens.weight.is_meta


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("kernel", ["dense", "flex"])
def test_micro_batch_context_is_rows_of_the_batch_context(kernel):
    """The pipeline builds masks and RoPE tables once per step and slices each micro-batch's context
    from them (issue 17: host work per micro-batch): the same tensors as the micro-batch's own
    context, the FlexAttention BlockMask's block tables too, and the same attention output (its rule
    rebound to the rows' own documents: a sliced BlockMask keeping the batch's rule would index the
    wrong rows)."""
    from megaflow.model.masks import BlockMask, attend, use_kernel
    from parallel.pipeline_step import context_rows
    from tests.model.test_masks import packed_batch, wide_config
    if kernel == "flex" and BlockMask is None:
        pytest.skip("FlexAttention needs torch >= 2.5")
    cfg = wide_config()
    model = build_model(cfg)
    two = packed_batch(cfg, rows=2, seq_len=128)
    batch = {key: torch.cat([t, t.flip(0)]) for key, t in two.items()}  # rows 2, 3 = rows 1, 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 128, 16, generator=g) for _ in range(3))
    with use_kernel(kernel):
        whole = model.context(batch)
        for start in (0, 2):
            own = model.context({key: t[start:start + 2] for key, t in batch.items()})
            part = context_rows(whole, batch, start, start + 2)
            for a, b in ((part.image_mask, own.image_mask), (part.cond_gate, own.cond_gate),
                         (part.vlm_skip, own.vlm_skip), (part.flow.cos, own.flow.cos), (part.vlm.sin, own.vlm.sin)):
                assert torch.equal(a, b)
            if kernel == "flex":
                assert isinstance(part.flow.mask, BlockMask)
                for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                             "q_num_blocks", "q_indices"):
                    assert torch.equal(getattr(part.flow.mask, name), getattr(own.flow.mask, name)), name
            else:
                assert torch.equal(part.flow.mask, own.flow.mask)
            want = attend(q, k, v, own.flow.mask)
            torch.testing.assert_close(attend(q, k, v, part.vlm.mask), want, rtol=0, atol=0)
            if kernel == "flex":  # the batch's own rule on the sliced tables would mask rows 2, 3 as rows 0, 1
                wrong = BlockMask.from_kv_blocks(*(getattr(part.flow.mask, n) for n in (
                    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")),
                    BLOCK_SIZE=part.flow.mask.BLOCK_SIZE, mask_mod=whole.flow.mask.mask_mod)
                assert start == 0 or not torch.allclose(attend(q, k, v, wrong), want)


def test_compiled_stage_regions_are_reused_across_micro_batches(monkeypatch):
    """The pipeline engine with train.compile=on: every compiled region (Pretzel unit, shallow coupling,
    heads + losses) is traced once, at the first micro-batch, and reused by the other micro-batches
    (their contexts are slices of the step's: views at other offsets) and by the next step: no
    recompile, no guard failure (a counting backend sees every graph dynamo hands over)."""
    import dataclasses as dc
    from data_pipeline.config import DataConfig
    from megaflow import speed
    from megaflow.config import load_config
    from parallel.runtime import build_engine, build_stages
    from tests.model.test_compiled_steps import Counting
    torch._dynamo.reset()
    backend = Counting()
    monkeypatch.setattr(speed, "BACKEND", backend)
    cfg = load_config(None, ["train.compile=on", "parallel.micro_batches=4"])
    cfg = dc.replace(cfg, model=dc.replace(tiny_config(), stage="all"),
                     data=DataConfig(image_size=8, channels=1, patch_size=2, seq_len=48, batch_size=8, max_images=2))
    topo = Topology()
    model, stages, tied = build_stages(cfg.model, cfg.parallel, topo, torch.device("cpu"), 0, None, 48)
    engine = build_engine(cfg, model, stages, tied, topo, None)
    batch = make_batch(cfg.model, 8, 48, 2, seed=0)
    noise = make_noise(cfg.model, batch)
    engine.train_step(batch, noise, None, 1e-4)
    first = backend.graphs
    engine.train_step(batch, noise, None, 1e-4)
    # one graph per region kind (the unit, the shallow coupling, the heads + losses), all four micro-batches
    assert backend.graphs == first == 3, (first, backend.graphs)
    torch._dynamo.reset()


def test_receives_are_posted_ahead_only_after_a_step_of_the_same_shape():
    """With parallel.overlap each action's receive is posted one action ahead, except in a step whose
    micro-batch shape is new (its kernels launch for the first time: autotuning synchronises the
    device, which must not wait on a receive posted early; parallel/pipeline_comm.py)."""
    cfg = tiny_config()
    with torch.device("meta"):
        model = STARFlow2(cfg)
    apply_stage(model, cfg.stage)
    stages = split_stages(model, 1, 0, micro_batches=2, verbose=False)
    load_stages(stages, build_model(cfg).state_dict())
    sched = PipelineSchedule(stages, Topology(), micro_batches=2)
    events = []
    post, forward, backward = sched._post_recv, sched._forward, sched._backward
    sched._post_recv = lambda a, *r: events.append(("post", a)) or post(a, *r)
    sched._forward = lambda a, *r: events.append(("run", a)) or forward(a, *r)
    sched._backward = lambda a, *r, **k: events.append(("run", a)) or backward(a, *r, **k)

    def order(batch):
        events.clear()
        sched.step(batch, make_noise(cfg, batch))
        return [(kind, sched.actions.index(a)) for kind, a in events]
    four, two = make_batch(cfg, 4, 48), make_batch(cfg, 2, 48)
    in_turn = [(kind, i) for i in range(4) for kind in ("post", "run")]
    ahead = [("post", 0)] + [e for i in range(4) for e in ((("post", i + 1),) if i < 3 else ()) + (("run", i),)]
    assert order(four) == in_turn  # first step: kernels launch for the first time
    assert order(four) == ahead
    assert order(two) == in_turn  # a new micro-batch shape
    assert order(two) == ahead
