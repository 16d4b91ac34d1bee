"""tools/bench_scaling.py's row logic (issues 17 and 20): layout names map to the parallel degrees
of the world they run in, efficiencies and bubbles come from the baselines of the same run with the
right theory (1F1B and interleaved), and `--resume SRC:DST` on real gloo processes resumes a
sharded checkpoint of one layout (DP=2) at another (TP=2) with the source's next loss (ZeRO
resharding itself: tests/parallel/test_dcp_reshard.py)."""
import json

import pytest

from tests.distributed import run_distributed
from tools.bench_scaling import efficiencies, layout


@pytest.mark.parametrize("name, world, want", [
    ("dp4", 4, dict(tp=1, pp=1, sequence_parallel=False)),
    ("dp2tp2", 4, dict(tp=2, pp=1, sequence_parallel=False)),
    ("tp2sp", 2, dict(tp=2, pp=1, sequence_parallel=True)),
    ("dp2pp2i", 4, dict(tp=1, pp=2, sequence_parallel=False, schedule="interleaved", virtual_stages=2)),
    ("pp2i4", 2, dict(tp=1, pp=2, sequence_parallel=False, schedule="interleaved", virtual_stages=4)),
    ("dp2tp2pp2", 8, dict(tp=2, pp=2, sequence_parallel=False)),
    ("one_mb", 4, {}), ("config", 4, None)])
def test_layout_names(name, world, want):
    assert layout(name, world) == want


@pytest.mark.parametrize("name, world", [("dp4", 2), ("tp3", 4), ("xp2", 2), ("dp2tp2", 8)])
def test_layout_names_that_do_not_fit_the_world_say_so(name, world):
    with pytest.raises(SystemExit, match=name):
        layout(name, world)


def test_efficiency_and_bubble_against_the_baselines():
    row = lambda name, step, tp=1, pp=1, v=1, gpus=4: dict(name=name, step_s=step, tp=tp, pp=pp, v=v, m=8,  # noqa: E731
                                                           gpus=gpus)
    rows = [row("one", 0.1, gpus=1), row("one_mb", 0.8, gpus=1), row("dp4", 0.125), row("dp2tp2", 0.0625, tp=2),
            row("dp2pp2", 0.5, pp=2), row("dp2pp2i", 0.45, pp=2, v=2),
            dict(row("one", 0.2, gpus=1), mode="one@train.compile=off"), dict(row("one_mb", 0.11, gpus=1), m=1)]
    efficiencies(rows, pp_baseline="one_mb")
    eff = {r["name"]: r.get("efficiency") for r in rows}
    # neither a baseline row with overrides nor one of another micro-batch count replaces the plain one
    assert eff["one"] is None and eff["dp4"] == pytest.approx(0.8) and eff["dp2tp2"] == pytest.approx(0.8)
    assert eff["dp2pp2"] == pytest.approx(0.8) and rows[4]["bubble"] == pytest.approx(0.2)
    assert rows[4]["bubble_theory"] == pytest.approx(1 / 9) and rows[5]["bubble_theory"] == pytest.approx(1 / 17)
    # the default: PP against the plain one-GPU step on the same rows (0.1 s), not the host-bound one_mb
    efficiencies(rows)
    assert rows[4]["efficiency"] == pytest.approx(0.1) and rows[4]["baseline"] == "one"
    assert rows[5]["efficiency"] == pytest.approx(0.1 / 0.9)
    # without a one row, PP falls back to one_mb
    efficiencies(rows[1:6])
    assert rows[4]["efficiency"] == pytest.approx(0.8) and rows[4]["baseline"] == "one_mb"


def _bench(rank, world, out):
    from tools.bench_scaling import main
    assert main(["--tiny", "--device", "cpu", "--modes", "one,dp2",
                 "--steps", "1", "--warmup", "0", "--profile", "0", "--resume", "dp2:tp2",
                 "--resume-dir", f"{out}/ckpt", "--json", f"{out}/s.json", "--turns", f"{out}/turns"]) == 0


def test_resume_from_one_layout_into_another(tmp_path):
    run_distributed(_bench, 2, str(tmp_path))
    res = json.loads((tmp_path / "s.json").read_text())
    assert [r["mode"] for r in res["rows"]] == ["one", "dp2"] and "efficiency" in res["rows"][1]
    turns = tmp_path / "turns"  # --turns (tools/bench_turns.py): this process said it was ready, took its turns, gave them back
    assert [p.name for p in turns.glob("ready.*")] and (turns / "owner").read_text() == ""
    r = res["resume"]
    assert r["load_step"] == 2 and r["rel_diff"] < 1e-5, r  # fp32 on CPU: the same loss up to reduction order
