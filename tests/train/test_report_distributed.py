"""Sample grids and the quality report under TP2, TP2 with sequence parallelism (also with async TP;
switched off while sampling), PP2 and ZeRO-3 (DP2) run on the split model
(real gloo processes, configs/tiny.yaml on the digits data, randomised weights).

Contract: on the same weights, for each layout, the report that rank 0 writes (report.json's
figures: generation, understanding with its answers, interleaved consistency; samples.png, its
sample grid) equals one process's (the PNG within one grey level), and so does the training-time
sample grid (images within 1e-5; under PP2 only, to keep the test fast);
every rank that takes part gets the same figures and only rank 0 writes files; and no rank ever
gathers the whole model (the TP gather and the whole-model state gather raise if called). The
report's images are denoised (flow.noise_std > 0): under PP that gradient runs back through the
stages, under ZeRO-3 through layers whose weights DeepSpeed gathers one at a time.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from megaflow.config import load_config
from tests.distributed import run_distributed
from tests.parallel.test_zero import deepspeed_ops  # noqa: F401 (fixture)
from tests.train.conftest import TINY

REPORT = ["train.report_samples=1", "train.report_images=4", "train.report_docs=1"]
LAYOUTS = {"tp2": dict(tp=2), "tp2sp": dict(tp=2, sequence_parallel=True),
           "tp2sp_async": dict(tp=2, sequence_parallel=True, async_tp=True), "pp2": dict(pp=2, micro_batches=2),
           "zero3": dict(zero_stage=3)}
GRID = "pp2"  # the training-time grid takes as many sampling calls as the report: checked on one layout (fast)


def no_gather(*a, **k):
    raise AssertionError("the whole model was gathered")


def _report(sampling, tok, cfg, out: Path, write: bool, grid: bool = True) -> dict:
    """The report (written into `out` when `write`) and the training-time grid, on `sampling`."""
    from megaflow.quality import progress_grid, write_report
    out.mkdir(parents=True)
    report = sampling.run(write_report, tok, cfg, out, torch.device("cpu"), None, write=write)
    grid = sampling.run(progress_grid, tok, cfg, 7) if grid else None
    return {"report": report, "grid": grid, "files": sorted(p.name for p in out.iterdir())}


def _layouts(rank, world, sets, state_path, root):
    import parallel.checkpoint
    import parallel.checkpoint_tp
    from megaflow.train import Sampling, load_run_tokenizer, with_tokenizer
    from parallel.runtime import build_engine, build_stages
    from parallel.topology import ParallelConfig, Topology
    parallel.checkpoint_tp.gather_full = no_gather
    parallel.checkpoint.full_model_state = no_gather
    cfg = load_config(str(TINY), [*sets, *REPORT])
    tok = load_run_tokenizer(cfg)
    state = torch.load(state_path)
    out = {}
    for name, dims in LAYOUTS.items():
        c = dataclasses.replace(cfg, parallel=ParallelConfig(**dims))
        topo = Topology(tp=c.parallel.tp, pp=c.parallel.pp)
        model, stages, tied = build_stages(with_tokenizer(c.model, tok), c.parallel, topo, "cpu", 0, state,
                                           c.data.seq_len)
        engine = build_engine(c, model, stages, tied, topo, None)
        out[name] = _report(Sampling(c, tok, model, engine, topo, torch.device("cpu")), tok, c,
                            Path(root) / f"{name}_{rank}", write=rank == 0, grid=name == GRID)
        if name == "zero3":  # every layer's weights were freed again after its forward: partitions only
            out[name]["held"] = sum(p.numel() for p in engine.module.parameters())
    return out


def _png(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path), dtype=np.int16)


def test_report_and_grids_under_tp_pp_zero3_equal_one_process(tiny_sets, tmp_path, deepspeed_ops):
    from megaflow.train import Sampling, load_run_tokenizer, with_tokenizer
    from tests.model.util import randomized_model
    cfg = load_config(str(TINY), [*tiny_sets, *REPORT])
    tok = load_run_tokenizer(cfg)
    ref = randomized_model(with_tokenizer(cfg.model, tok), seed=3, scale=0.1)
    torch.save(ref.state_dict(), tmp_path / "state.pt")
    one = _report(Sampling(cfg, tok, ref, None, None, torch.device("cpu")), tok, cfg, tmp_path / "one", True)
    want = one["report"]
    assert one["files"] == ["report.json", "report.txt", "samples.png"]
    assert {"generation_accuracy", "understanding_accuracy", "interleaved_consistency"} <= want.keys()
    assert float(one["grid"].std()) > 0.05, "the samples are trivially constant"

    got = run_distributed(_layouts, 2, tiny_sets, str(tmp_path / "state.pt"), str(tmp_path))
    figures = [k for k in want if not k.endswith("seconds")]
    for name in LAYOUTS:
        for rank in (0, 1):
            mine = got[rank][name]
            assert {k: mine["report"][k] for k in figures} == {k: want[k] for k in figures}, (name, rank)
            if name == GRID:
                assert float((mine["grid"] - one["grid"]).abs().max()) < 1e-5, (name, rank)
        assert got[0][name]["files"] == one["files"] and got[1][name]["files"] == [], name
        written = json.loads((tmp_path / f"{name}_0" / "report.json").read_text())
        assert written["generation_accuracy"] == want["generation_accuracy"], name
        diff = np.abs(_png(tmp_path / f"{name}_0" / "samples.png") - _png(tmp_path / "one" / "samples.png"))
        assert diff.max() <= 1, (name, diff.max())
    assert got[0]["zero3"]["held"] == got[1]["zero3"]["held"] == 0, "ZeRO-3 weights left gathered"


def test_sequence_parallel_is_switched_off_for_sampling_and_restored(caplog):
    """Decoding feeds one token at a time, which a sequence split cannot cut: while sampling, the
    SP switches of parallel/layers.py's layers are off (and back on after, even on an error); a layer
    whose split cannot be switched (another backend's) makes the run skip grids and the report with
    a warning naming the tool that judges a checkpoint afterwards, instead of failing at the end."""
    from types import SimpleNamespace
    from megaflow.model.layers import RMSNorm
    from megaflow.model.starflow import build_model
    from megaflow.train import Sampling
    from parallel.layers import ColumnParallelLinear, ParallelRMSNorm, SequenceSplit
    from parallel.sampling import sequence_parallel_off
    from tests.helpers import tiny_config
    model = build_model(tiny_config())
    split = model.seq_split = SequenceSplit(group=object())  # what apply_tp installs under sequence_parallel
    norm = model.flow_norm = ParallelRMSNorm.from_dense(RMSNorm(model.flow_norm.weight.shape[0]), object(),
                                                       "gather_replicated", True)
    gate_up = model.units["0"].flow_layer.mlp.gate_up  # async TP: the column layer gathers T itself
    column = model.units["0"].flow_layer.mlp.gate_up = ColumnParallelLinear.from_dense(gate_up, None, "gather")
    try:
        with sequence_parallel_off([model]):
            assert isinstance(model.seq_split, torch.nn.Identity) and norm.entry is None and not norm.sequence_parallel
            assert column.input_comm == "copy"
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model.seq_split is split and norm.entry == "gather_replicated" and norm.sequence_parallel
    assert column.input_comm == "gather"

    class OtherBackendLinear(torch.nn.Linear):
        sequence_parallel = True
    model.flow_in = OtherBackendLinear(2, 2)
    cfg = load_config(str(TINY), ["train.report=true"])
    topo = SimpleNamespace(rank=0, dp_rank=0, tp=2, pp=1)
    sampling = Sampling(cfg, None, model, SimpleNamespace(), topo, torch.device("cpu"))
    assert sampling.run(no_gather) is None
    assert "tools/eval_quality.py" in caplog.text
