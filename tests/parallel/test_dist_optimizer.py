"""The distributed optimizer (parallel.dp_shard_optimizer, parallel/dist_optimizer.py) trains as the all-reduce path.

Contract, on real gloo processes (DP=2 and DP=3; tiny buckets, at DP=3 some of which do not split evenly, so
the all-reduced remainder is exercised): with gradient buckets reduce-scattered during backward, AdamW stepping only
this rank's shard and the bf16 weights all-gathered, 2 steps (clipped, changing lr, 2 micro-batches) give
  - the all-reduce path's DP-summed gradients on every element this rank owns (bitwise at DP=2), its gradient
    norms (summed from the shards; > 1, so the steps are clipped), losses and weights (to fp32 rounding: the norm
    is summed in another order), and one process's losses;
  - bitwise the same with overlap off (buckets reduce-scattered after backward) as on;
  - bitwise the same when the step function runs as train.step_graph captures it (lr a 0-d tensor, capturable
    groups), which reads nothing back to the host.
A checkpoint saved by a sharded DP=2 run (DCP, parallel/checkpoint.py) resumes a sharded run bitwise (the next
loss and the weights after it) and an unsharded one (the next loss bitwise): the state it writes is whole.
"""
import tempfile
from pathlib import Path

import pytest
import torch

from parallel.topology import ParallelConfig
from tests.distributed import run_distributed
from tests.helpers import make_batch, make_noise
from tests.parallel.test_overlap import ROWS, _engine, _HostReads
from tests.parallel.test_pp_dist import _config


def _fused(engine):
    """As on CUDA: the fused AdamW's clip and skip stay on the device, and the engine steps the flat kernel."""
    for group in engine.optimizer.param_groups:
        group["fused"] = True
    engine.optimizer.defaults["fused"] = engine.weights.flat_step = True
    return engine


def _part(batch, noise, topo):
    n = len(noise)
    rows = slice(topo.dp_rank * n // topo.dp, (topo.dp_rank + 1) * n // topo.dp)
    return {k: t[rows] for k, t in batch.items()}, noise[rows], None


def _owned(engine):
    """A mask over the flat gradient buffer: the elements this rank holds DP sums of (its chunks, the remainders)."""
    mask = torch.zeros(engine.weights.flat_main_grad.numel(), dtype=torch.bool)
    for a, b, _ in engine.weights.ranges:
        mask[a:b] = True
    return mask


def _sharded(rank, world):
    mcfg = _config(4)
    batch = make_batch(mcfg, 4 * world, 48)  # 4 rows a rank: 2 micro-batches of 2
    noise = make_noise(mcfg, batch)
    out = {}
    # DP=3 (uneven buckets) against the all-reduce path only: the rest does not depend on the degree
    for name in ("one", "all_reduce", "sharded", "sharded_no_overlap", "captured")[:5 if world == 2 else 3]:
        engine, topo = _engine(name != "sharded_no_overlap", 1, "1f1b", 1, 2, True, one_process=name == "one",
                               shard=name in ("sharded", "sharded_no_overlap", "captured"))
        _fused(engine)
        part = _part(batch, noise, topo) if name != "one" else (batch, noise, None)
        spy, losses, norms, grads = _HostReads(), [], [], None
        for step in range(2):
            lr = 1e-3 * (step + 1)
            if name != "captured":
                res = engine.train_step(*part, lr)
            else:
                for group in engine.optimizer.param_groups:  # what megaflow/step_graph.py's StepGraph sets
                    group["capturable"] = True
                engine.sharded.stale = True  # train_step's, as the graph's replay does
                with spy:
                    res = engine._step(*part, torch.tensor(lr))
            losses.append(float(res["loss"]))
            norms.append(float(res["grad_norm"]))
            if step == 0:
                grads = engine.weights.flat_main_grad.clone()
        out[name] = dict(losses=losses, norms=norms, grads=grads, weights=engine.model_state_dict(), reads=spy.reads,
                         owned=_owned(engine) if engine.sharded is not None else None, early=engine.buckets.early,
                         uneven=sum(b.flat.numel() % world > 0 for b in engine.buckets.buckets))
    ref, sharded = out["all_reduce"], out["sharded"]
    owned = sharded["owned"]
    assert sharded["early"] > 0 and (sharded["uneven"] > 0 or world == 2), sharded  # during backward; remainders
    assert 0 < owned.sum() < owned.numel()
    if world == 2:  # a + b either way: the owned sums are the all-reduce's bitwise
        assert torch.equal(sharded["grads"][owned], ref["grads"][owned])
    torch.testing.assert_close(sharded["grads"][owned], ref["grads"][owned], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sharded["losses"], ref["losses"], rtol=1e-5, atol=0)
    # the norm from the shards (one all-reduce of the owned squares) is the whole gradient's; > 1: clipped
    torch.testing.assert_close(sharded["norms"], ref["norms"], rtol=1e-5, atol=0)
    assert min(ref["norms"]) > 1.0, ref["norms"]
    for k, w in ref["weights"].items():  # whole on every rank (sync_state), the all-reduce path's to fp32 rounding
        torch.testing.assert_close(sharded["weights"][k], w, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(sharded["losses"], out["one"]["losses"], rtol=1e-4, atol=0)
    for other in ("sharded_no_overlap", "captured") if world == 2 else ():
        assert out[other]["losses"] == sharded["losses"], (other, out[other]["losses"], sharded["losses"])
        assert out[other]["norms"] == sharded["norms"], other
        assert torch.equal(out[other]["grads"][owned], sharded["grads"][owned]), other
        for k, w in sharded["weights"].items():
            assert torch.equal(out[other]["weights"][k], w), (other, k)
    assert world > 2 or out["captured"]["reads"] == [], out["captured"]["reads"]
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_optimizer_equals_all_reduce_path_and_one_process(world):
    assert all(run_distributed(_sharded, world))


def _resume(rank, world, root, moments):
    from parallel.checkpoint import load_engine_state, save_distributed, save_engine_state
    mcfg = _config(4)
    batch = make_batch(mcfg, ROWS, 48)
    noise = make_noise(mcfg, batch)
    engine, topo = _engine(True, 1, "1f1b", 1, 2, True, shard=True, moments=moments)
    part = _part(batch, noise, topo)
    for step in range(2):
        _fused(engine).train_step(*part, 1e-3)
    assert engine.weights._flat[0].dtype == (torch.bfloat16 if moments == "bf16" else torch.float32)
    path = save_distributed(root, 2, lambda d: save_engine_state(engine, d, topo), 1, topo)
    third = float(engine.train_step(*part, 1e-3)["loss"])
    after = engine.model_state_dict()
    for shard in (True, False):
        resumed, _ = _engine(True, 1, "1f1b", 1, 2, True, shard=shard, moments=moments)
        assert load_engine_state(_fused(resumed), Path(path), topo) == 2
        assert float(resumed.train_step(*part, 1e-3)["loss"]) == third, shard
        if shard:
            for k, w in resumed.model_state_dict().items():
                assert torch.equal(w, after[k]), k
    return True


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_sharded_checkpoint_resumes_sharded_and_unsharded(moments):
    """DP=2 with the sharded optimizer saves (its moments all-gathered first) and resumes bitwise, sharded or not;
    with train.moments_dtype=bf16 the sharded checkpoint holds bf16 moments and resumes the same way."""
    with tempfile.TemporaryDirectory() as root:
        assert all(run_distributed(_resume, 2, root, moments))


def test_sharded_optimizer_refuses_other_layouts():
    for bad in (dict(tp=2), dict(pp=2), dict(zero_stage=1)):
        with pytest.raises(ValueError, match="dp_shard_optimizer=on shards the optimizer over data parallelism alone"):
            ParallelConfig(dp_shard_optimizer=True, **bad)
        assert not ParallelConfig(**bad).shard_optimizer(bf16_weights=True)  # 'auto' (the default): off there


def test_auto_shards_data_parallelism_with_bf16_weights_only_and_a_bad_value_is_refused():
    assert ParallelConfig().dp_shard_optimizer == "auto"
    assert ParallelConfig().shard_optimizer(bf16_weights=True)
    assert not ParallelConfig().shard_optimizer(bf16_weights=False)  # fp32 weights: copied buckets
    assert not ParallelConfig(dp_shard_optimizer=False).shard_optimizer(bf16_weights=True)
    assert ParallelConfig(dp_shard_optimizer="on").shard_optimizer(bf16_weights=True)
    with pytest.raises(ValueError, match="dp_shard_optimizer='sometimes' must be 'auto', 'on' or 'off'"):
        ParallelConfig(dp_shard_optimizer="sometimes")
