"""`megaflow train` on several processes (2 gloo processes on CPU, configs/tiny.yaml), as torchrun runs it.

Each run is `torchrun --nproc_per_node 2 -m megaflow.cli train ...` without torchrun's own start-up
(tests/distributed.launch: forked ranks with torchrun's environment; a real torchrun launches in
tests/tools/test_reshard_train.py, tests/train/test_save_on_signal.py and the SLURM test); losses
come from the history in the run's checkpoints (every rank reports the global loss; rank 0 writes it).
Resume is tested by copying the step-3 checkpoint of an uninterrupted 6-step run into a fresh run
directory and resuming it to step 6: steps 4..6 must repeat the uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import launch, run_distributed
from tests.train.conftest import REPO, megaflow, train_args

STEPS = ["train.steps=6", "train.save_every=3", "train.keep_last=5", "train.eval_data="]


def eval_on(sets: list) -> str:
    """The held-out data override of `sets` (STEPS switches evaluation off; this turns it back on)."""
    return next(x for x in sets if x.startswith("train.eval_data="))


def torchrun(sets: list, out: Path, *more: str, resume: bool = False, check: bool = True, nproc: int = 2):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"))
    args = ["-m", "megaflow.cli", *train_args(sets, out, *STEPS, *more), *(["--resume"] if resume else [])]
    res = launch(nproc, args, REPO, env)
    if check and res.returncode != 0:
        raise AssertionError(f"torchrun exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


def _load(ckpt: Path, name: str):
    return torch.load(ckpt / name, map_location="cpu", weights_only=False)


def _weights(ckpt: Path) -> dict:
    """The checkpoint's whole weights (a multi-process run's sharded state/, read in this process)."""
    from tools.reshard import weights_of
    return weights_of(ckpt)


def _losses(out: Path, step: int = 6) -> list:
    return [h["loss"] for h in _load(out / "checkpoints" / f"step_{step:06d}", "trainer.pt")["history"]]


def _resume_from_step3(sets: list, whole: Path, split: Path, *more: str):
    """Resume a copy of `whole`'s step-3 checkpoint to step 6; returns the torchrun result."""
    (split / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_000003", split / "checkpoints" / "step_000003")
    res = torchrun(sets, split, *more, resume=True)
    assert "at step 3" in res.stderr, res.stderr[-2000:]
    return res


def _assert_same_run(whole: Path, split: Path, tol: float):
    a, b = _losses(whole), _losses(split)
    assert len(a) == len(b) == 6 and a[:3] == b[:3]
    assert max(abs(x - y) for x, y in zip(a[3:], b[3:])) <= tol, (a, b)
    wa = _weights(whole / "checkpoints" / "step_000006")
    wb = _weights(split / "checkpoints" / "step_000006")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= tol
    moved = _weights(split / "checkpoints" / "step_000003")
    assert any(not torch.equal(moved[k], wb[k]) for k in wb), "the resumed run did not train"


def _reference_dp2(sets: list, steps: int):
    """One process, PlainEngine, on the GLOBAL batch of a DP=2 run: each step the rows of dp rank 0
    then dp rank 1 (their own loaders), with each rank's noise and condition mask."""
    from data_pipeline.loader import build_loader
    from megaflow.config import load_config
    from megaflow.optim import lr_at
    from megaflow.train import PlainEngine, build, load_run_tokenizer, step_randomness
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [*sets, *STEPS])
    tok = load_run_tokenizer(cfg)
    per_rank = []
    for r in range(2):  # one loader at a time: each owns its Streaming shared memory
        with build_loader(cfg.data, tok, r, 2) as loader:
            it = iter(loader)
            per_rank.append([next(it) for _ in range(steps)])
    model = build(cfg, tok, torch.device("cpu"))
    engine = PlainEngine(model, cfg, None)
    losses = []
    for s in range(steps):
        parts = [per_rank[r][s] for r in range(2)]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        rand = [step_randomness(cfg, model.cfg, p, s, r, "cpu") for r, p in enumerate(parts)]
        noise, keep = torch.cat([n for n, _ in rand]), torch.cat([k for _, k in rand])
        t = cfg.train
        losses.append(float(engine.train_step(batch, noise, keep, lr_at(s, t.lr, t.min_lr, t.warmup, t.steps))["loss"]))
    return losses, model.state_dict()


def _single_process_loss(ckpt: Path, step: int, dp_size: int = 1):
    """The loss of `step` (0-based) computed in ONE process from checkpoint `ckpt` (loaded with
    megaflow.inference.load_for_inference), on the batch the run's loader gives next."""
    from data_pipeline.loader import build_loader
    from megaflow.inference import load_for_inference
    from megaflow.train import step_randomness
    model, tok, cfg, _ = load_for_inference(ckpt)
    with build_loader(cfg.data, tok, 0, dp_size) as loader:
        loader.load_state_dict(_load(ckpt, "trainer.pt")["loader"])
        batch = next(iter(loader))
    noise, keep = step_randomness(cfg, model.cfg, batch, step, 0, "cpu")
    with torch.no_grad():
        loss, _ = model(batch, noise, keep)
    return float(loss)


def test_dp2_equals_one_process_on_the_global_batch(tiny_sets, tmp_path):
    """Contract: DP=2 (`torchrun --nproc_per_node 2`, ParallelEngine) gives, at every one of 6 steps,
    the loss (1e-5) of ONE process (PlainEngine, the same seed-0 init) trained on the global batch,
    i.e. the two ranks' batches concatenated, with each rank's noise and condition mask; the final
    weights agree to 1e-5. So the loss is normalised by global counts, the gradients are summed
    (not averaged) over DP, the clip uses the global norm and each rank reads its own data shard.
    ZeRO-1 on the same launch (DeepSpeed reduces, clips and steps) gives the same losses (1e-5), and
    its save -> resume from step 3 repeats steps 4..6 exactly (1e-6) with the same final weights
    (the resumed run saves asynchronously: train.async_save).
    The DP=2 checkpoint (sharded) resumes in ONE process (optimizer state included) and trains on.
    ZeRO-3 gives the same losses, and its held-out evaluation (distributed: the partitioned model,
    nothing gathered) equals the DP=2 run's."""
    dp = tmp_path / "dp"
    torchrun(tiny_sets, dp, eval_on(tiny_sets))
    ref_losses, ref_weights = _reference_dp2(tiny_sets, 6)
    got = _losses(dp)
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) < 1e-5, (got, ref_losses)
    weights = _weights(dp / "checkpoints" / "step_000006")
    assert max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights) < 1e-5

    one_dir = tmp_path / "dp_then_one"
    shutil.copytree(dp / "checkpoints", one_dir / "checkpoints")
    one = megaflow(*train_args(tiny_sets, one_dir, *STEPS, "train.steps=7", "train.save_every=0"), "--resume")
    assert "at step 6" in one.stderr, one.stderr[-2000:]
    assert len(_losses(one_dir, 7)) == 7 and _losses(one_dir, 7)[:6] == got

    zero, zero_split = tmp_path / "zero", tmp_path / "zero_split"
    torchrun(tiny_sets, zero, "parallel.zero_stage=1")
    assert (zero / "checkpoints" / "step_000003" / "state" / ".metadata").is_file()
    assert max(abs(a - b) for a, b in zip(_losses(zero), got)) < 1e-5, (_losses(zero), got)
    _resume_from_step3(tiny_sets, zero, zero_split, "parallel.zero_stage=1", "train.async_save=true")
    _assert_same_run(zero, zero_split, 1e-6)  # its checkpoints written in the background, committed

    # ZeRO-3 partitions the weights: held-out evaluation runs on the partitioned model (DeepSpeed
    # fetches each layer's weights in the forward, as in training) and must equal the DP run's
    zero3 = tmp_path / "zero3"
    torchrun(tiny_sets, zero3, "parallel.zero_stage=3", eval_on(tiny_sets))
    assert max(abs(a - b) for a, b in zip(_losses(zero3), got)) < 1e-5, (_losses(zero3), got)
    evals = [json.loads((d / "result.json").read_text())["eval"] for d in (dp, zero3)]
    assert evals[0].keys() == {"bits_per_dim", "bits_per_dim_tarflow", "text_loss"}, evals
    assert all(abs(evals[0][k] - evals[1][k]) < 1e-5 * abs(evals[0][k]) for k in evals[0]), evals


@pytest.fixture(scope="module")
def one_process_from_tiny_run(tiny_sets, tiny_run, tmp_path_factory) -> Path:
    """One process, 6 steps, initialised from the trained tiny run (a start both layouts can load)."""
    out = tmp_path_factory.mktemp("one_process")
    megaflow(*train_args(tiny_sets, out, *STEPS, f"train.init_from={tiny_run}", eval_on(tiny_sets)))
    return out


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_tp2_and_pp2_equal_one_process_resume_and_load(tiny_sets, tiny_run, one_process_from_tiny_run, tmp_path,
                                                       layout):
    """Contract: TP=2 (flow stream split too) and PP=2 (1F1B, 3 micro-batches), initialised from the
    same checkpoint as a one-process run (train.init_from, sliced per rank), give its loss at all 6
    steps (1e-5) and its gradient norm at the last step (1e-5 relative; clipping is active at 1.0,
    so replicated parameters counted twice or shards once would show); the step-3 checkpoint,
        resumed, repeats steps 4..6 (loss and final weights within 1e-6 on CPU). Held-out evaluation (on
    the split model, figures reduced over TP / PP) equals the one-process run's (1e-5), and the
    quality report is written (generated on the split model: PipelinedModel / the TP model). The sharded checkpoint loads in a single process
    (megaflow.inference.load_for_inference) and that model's loss on step 4's batch (the saved
    loader position, the same noise) equals the distributed step-4 loss (1e-5)."""
    more = [layout, f"train.init_from={tiny_run}"] + (["parallel.micro_batches=3"] if layout.endswith("pp=2") else [])
    whole, split = tmp_path / "whole", tmp_path / "split"
    torchrun(tiny_sets, whole, *more, eval_on(tiny_sets), "train.report=true", "train.report_samples=1", "train.report_images=4",
             "train.report_docs=1")
    ref = one_process_from_tiny_run
    assert max(abs(a - b) for a, b in zip(_losses(whole), _losses(ref))) < 1e-5, (_losses(whole), _losses(ref))
    results = [json.loads((d / "result.json").read_text()) for d in (whole, ref)]
    norms = [r["train"]["grad_norm"] for r in results]
    assert norms[1] > 1.0 and abs(norms[0] - norms[1]) < 1e-5 * norms[1], norms
    # held-out evaluation, and the report, run on the split model (nothing gathered)
    evals = [r["eval"] for r in results]
    assert evals[0].keys() == evals[1].keys() == {"bits_per_dim", "bits_per_dim_tarflow", "text_loss"}, evals
    assert all(abs(evals[0][k] - evals[1][k]) < 1e-5 * abs(evals[1][k]) for k in evals[1]), evals
    report = json.loads((whole / "report.json").read_text())
    assert {"generation_accuracy", "understanding_accuracy", "interleaved_consistency"} <= report.keys()

    res = _resume_from_step3(tiny_sets, whole, split, *more)
    assert "pipeline layout:" in res.stdout
    _assert_same_run(whole, split, 1e-6)
    ckpt = whole / "checkpoints" / "step_000003"
    one = _single_process_loss(ckpt, 3)
    assert abs(one - _losses(whole)[3]) < 1e-5, (one, _losses(whole)[3])


def test_dp2_pp2_interleaved_tied_equals_one_process(tiny_sets, tmp_path):
    """Contract: 4 processes, DP2 x PP2 with the interleaved schedule (2 chunks per rank, 2
    micro-batches) and the token embedding tied to the LM head across the first and last stages,
    started from the same checkpoint (train.init_from, a 1-step one-process run of this geometry),
    give at all 6 steps the loss (1e-5) of one process trained on the concatenated global batch, and
    the same final weights (1e-5). Weight decay is set high (10), so the last stage's LM-head copy
    decayed as a matrix (it must not: it is the embedding) would show in the loss."""
    geometry = ["model.flow.n_layers=4", "model.vlm.n_layers=4", "model.vlm.tie_embeddings=true",
                "train.weight_decay=10.0", "data.batch_size=4"]
    base = tmp_path / "base"
    megaflow(*train_args(tiny_sets, base, *geometry, "train.steps=1", "train.eval_data=", "train.report=false"))
    sets = [*tiny_sets, *geometry, f"train.init_from={base}"]
    run = tmp_path / "run"
    torchrun(sets, run, "parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
             "parallel.micro_batches=2", nproc=4)
    ref_losses, ref_weights = _reference_dp2(sets, 6)
    got = _losses(run)
    assert max(abs(a - b) for a, b in zip(got, ref_losses)) < 1e-5, (got, ref_losses)
    weights = _weights(run / "checkpoints" / "step_000006")
    assert weights.keys() == ref_weights.keys()
    assert max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights) < 1e-5


def test_layout_errors_name_what_to_launch(tiny_sets, tmp_path):
    """Contract: a layout the launch cannot hold fails before training with exit code 2 and a message
    naming the degrees and what to launch: tp=2 in one process, pp=3 on 2 processes."""
    res = megaflow(*train_args(tiny_sets, tmp_path / "one", "parallel.tp=2"), check=False)
    assert res.returncode == 2 and "need several processes" in res.stderr and "torchrun" in res.stderr
    res = torchrun(tiny_sets, tmp_path / "two", "parallel.pp=3", check=False)
    assert res.returncode != 0 and "parallel.pp=3" in res.stderr and "multiple of tp * pp = 3" in res.stderr


def test_fp8_and_te_layouts_pass_check_layout():
    """Multi-process FP8 and the TE backend at tp=1 (one unsharded TE linear per block on each pipeline
    stage) are wired (issue 19): check_layout accepts them; what TE cannot serve is refused
    (tests/parallel/test_fused_te.py)."""
    from parallel.runtime import check_layout
    from parallel.topology import ParallelConfig
    check_layout(ParallelConfig(tp=2, backend="te", fp8="delayed"), 2)
    check_layout(ParallelConfig(pp=2, backend="te", fp8="current"), 2)
    check_layout(ParallelConfig(tp=2, backend="te"), 4)  # TE's tensor-parallel layers: accepted


def test_tied_lm_head_on_the_last_stage_is_not_decayed():
    """Contract: weight decay follows a parameter's role: with vlm.tie_embeddings, the LM head is the
    embedding (no decay) in one process AND on a pipeline's last stage, where it is a separate copy
    named `lm_head.weight` (parallel.pipeline.TiedEmbeddings); untied, the LM head decays."""
    import dataclasses

    from megaflow.config import load_config
    from megaflow.model.starflow import STARFlow2
    from megaflow.optim import param_groups
    from parallel.pipeline import split_stages
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), []).model
    for tied in (True, False):
        mcfg = dataclasses.replace(cfg, vlm=dataclasses.replace(cfg.vlm, tie_embeddings=tied, vocab_size=64))
        with torch.device("meta"):
            last = split_stages(STARFlow2(mcfg), 2, 1, verbose=False)[0].module
            whole = STARFlow2(mcfg)
        for model in (whole, last):
            decayed = {id(p) for g in param_groups(model, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
            assert (id(model.lm_head.weight) in decayed) is not tied, (tied, model is last)


def test_launch_env_reads_torchrun_and_srun(monkeypatch):
    """Contract: torchrun's RANK / WORLD_SIZE / LOCAL_RANK win; without them srun's SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID are used, and a missing MASTER_ADDR under srun is an error saying
    how to set it; one process is no launch. The environment is left as it was."""
    from parallel.runtime import LaunchEnv, launch_env
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR",
              "MASTER_PORT"):
        monkeypatch.setenv(k, "0")  # recorded, so the teardown restores the real value (or its absence)
        monkeypatch.delenv(k)
    assert launch_env() is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        launch_env()
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert launch_env() == LaunchEnv(5, 8, 1) and "RANK" not in os.environ
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_env() == LaunchEnv(2, 4, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_env() is None


def _plain_dp2(rank, world):
    import torch.distributed as dist

    from megaflow.config import load_config
    from megaflow.model.starflow import build_model
    from megaflow.train import PlainEngine, read_metrics
    from tests.parallel.test_pp_dist import _config, _data
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), ["train.grad_clip=0.5"])
    mcfg = _config(2)
    batch, noise = _data(mcfg)  # rows hold different numbers of text tokens and image dims
    rows = slice(2 * rank, 2 * rank + 2)
    out = {}
    for name, group, part in (("one", None, slice(None)), ("dp", dist.group.WORLD, rows)):
        engine = PlainEngine(build_model(mcfg, seed=0), cfg, None, dp_group=group)
        out[name] = [read_metrics(engine.train_step({k: v[part] for k, v in batch.items()}, noise[part], None, 1e-3))
                     for _ in range(3)]  # the step returns device tensors; floats through the queue
        out[name + "_weights"] = engine.model.state_dict()
    w1, w2 = out.pop("one_weights"), out.pop("dp_weights")
    out["weight_diff"] = max(float((w1[k] - w2[k]).abs().max()) for k in w1)  # floats only through the queue
    return out


def test_plain_engine_data_parallel_uses_global_counts():
    """Contract: PlainEngine(dp_group=...) on 2 gloo ranks, each with 2 of 4 rows that hold different
    numbers of text tokens and image dims, gives the one-process loss, gradient norm (clipping
    active) and metrics on the 4 rows at each of 3 steps (1e-5), and the same weights (1e-5): the loss
    is normalised by counts summed over DP and the gradients are summed, not averaged."""
    for out in run_distributed(_plain_dp2, 2):
        for one, dp in zip(out["one"], out["dp"]):
            assert one.keys() == dp.keys() and one["grad_norm"] > 0.5, (one, dp)
            assert all(abs(one[k] - dp[k]) < 1e-5 * max(1.0, abs(one[k])) for k in one), (one, dp)
        assert out["weight_diff"] < 1e-5, out["weight_diff"]
