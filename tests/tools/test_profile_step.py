"""tools/profile_step.py (`megaflow profile`) on CPU with configs/tiny.yaml.

Contract: 2 warm-up + 3 timed steps of the real PlainEngine step report, in the printed table and
the --json file, a positive median step time (between the min and the max), tokens/s equal to
rows x seq_len / step time, positive images/s, model TFLOP/s equal to monitor.step_flops of the
batch / step time, MFU = TFLOP/s / --peak-tflops (and null without a peak on CPU), a positive peak
memory and a finite loss; --trace writes a chrome trace that parses as JSON with events, and a
top-ops table. The synthetic batch follows the batch contract: no padding, image slots exactly
where image_mask says, no target is an image slot. More images than data.max_images, or than fit in seq_len, exit 2.
"""
from __future__ import annotations

import json
import math

import torch

from megaflow.cli import main as cli_main
from megaflow.config import load_config
from tools.profile_step import main, synthetic_batch


def test_profile_tiny_on_cpu_with_trace(tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["--config", "configs/tiny.yaml", "--device", "cpu", "--warmup", "2", "--steps", "3",
            "--peak-tflops", "1", "--trace", str(tmp_path / "trace"), "--trace-loop", "--json", str(out)]
    assert cli_main(["profile", *argv]) == 0
    text = capsys.readouterr().out
    for want in ("step time", "tokens/s", "images/s", "model TFLOP/s", "MFU", "peak memory", "Self CPU"):
        assert want in text, want
    r = json.loads(out.read_text())
    assert r["steps"] == 3 and r["warmup"] == 2 and r["rows"] == 3 and r["seq_len"] == 128
    assert 0 < r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
    assert math.isclose(r["tokens_per_s"], 3 * 128 / r["step_time_s"], rel_tol=1e-9)
    assert r["images_per_s"] > 0 and r["images_per_step"] == 9  # 3 per row: half of 128 tokens / (16 + 2)
    assert r["model_tflops"] > 0 and math.isclose(r["mfu"], r["model_tflops"], rel_tol=1e-9)  # peak 1 TFLOP/s
    assert math.isclose(r["model_tflops"], r["model_tflop_per_step"] / r["step_time_s"], rel_tol=1e-9)
    assert r["peak_memory_gib"] > 0 and math.isfinite(r["last_loss"])
    trace = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert len(trace["traceEvents"]) > 100
    assert "aten::mm" in (tmp_path / "trace" / "top_ops.txt").read_text()
    assert r["trace_back_to_back"] and "Self CPU" in (tmp_path / "trace" / "top_host_ops.txt").read_text()
    assert r["loop_prep_ms"] > 0  # the host's time preparing each back-to-back step's inputs
    assert r["synced_rest_ms"] > 0  # and between two synced steps (the GPU's rest)


def test_no_peak_on_cpu_means_no_mfu_and_bad_images_exit_2(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["--config", "configs/tiny.yaml", "--device", "cpu", "--warmup", "0", "--steps", "1",
                 "--images-per-row", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mfu"] is None and r["images_per_s"] == 0 and r["tokens_per_s"] > 0
    assert "pass --peak-tflops" in capsys.readouterr().out
    assert main(["--config", "configs/tiny.yaml", "--device", "cpu", "--images-per-row", "5"]) == 2
    assert "more than data.max_images=4" in capsys.readouterr().err
    assert main(["--config", "configs/tiny.yaml", "--set", "data.max_images=8", "--images-per-row", "8"]) == 2
    assert "do not fit in seq_len=128" in capsys.readouterr().err


def test_synthetic_batch_follows_the_batch_contract():
    from megaflow.monitor import step_flops
    from megaflow.model.starflow import build_model
    m = load_config("configs/tiny.yaml").model
    b = synthetic_batch(m, rows=2, seq_len=128, images_per_row=3)
    t, N = m.tokens, m.fae.n_tokens
    assert b["tokens"].shape == (2, 128) and not (b["tokens"] == t.pad_id).any()
    assert torch.equal(b["image_mask"], b["tokens"] == t.image_id)
    assert int(b["image_mask"].sum()) == 2 * 3 * N and int((b["tokens"] == t.boi_id).sum()) == 6
    assert (b["targets"][:, :-1] == torch.where(b["image_mask"][:, 1:], -100, b["tokens"][:, 1:])).all()
    assert b["images"].shape == (2, 3, 1, 8, 8) and b["image_valid"].all()
    model = build_model(m)
    loss, _ = model(b, torch.randn(2, 3, N, m.fae.latent_dim))
    assert torch.isfinite(loss) and step_flops(model, b) > 0


def test_variants_baseline_and_parts_in_one_process(tmp_path, capsys):
    """--variant rows (each its overrides; a bad one is reported, not fatal), --parts of one variant
    (times of the VLM stream, deep flow, shallow flows, heads+losses and skips, whose FLOPs add up to
    the step's but for the embeddings), --baseline (the plain Llama of the VLM stream's shape)."""
    from megaflow.monitor import step_flops
    from megaflow.model.starflow import build_model
    out = tmp_path / "v.json"
    assert main(["--config", "configs/tiny.yaml", "--device", "cpu", "--warmup", "1", "--steps", "1",
                 "--peak-tflops", "1", "--baseline", "--parts", "sel",
                 "--variant", "eager=", "--variant", "sel=train.activation_checkpointing=selective",
                 "--variant", "bad=train.compile=maybe", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for want in ("eager", "sel", "bad", "failed", "VLM stream", "deep flow", "shallow flows", "baseline:"):
        assert want in text, want
    r = json.loads(out.read_text())
    rows = {v["variant"]: v for v in r["variants"]}
    assert rows["sel"]["activation_checkpointing"] == "selective" and rows["eager"]["compiled_regions"] == 0
    assert "train.compile" in rows["bad"]["error"] and "parts" not in rows["eager"]
    parts = rows["sel"]["parts"]["parts"]
    assert set(parts) == {"VLM stream", "deep flow", "shallow flows", "heads+losses", "skips"}
    assert all(p["time_s"] > 0 for p in parts.values())
    cfg = load_config("configs/tiny.yaml")
    model = build_model(cfg.model)
    b = synthetic_batch(cfg.model, cfg.data.batch_size, cfg.data.seq_len, rows["sel"]["images_per_step"] // 3)
    embed = 6.0 * sum(p.numel() for n, p in model.named_parameters()
                      if p.dim() == 2 and n.startswith(("adapter.", "flow_in."))) * b["tokens"].numel()
    assert math.isclose(sum(p["flops"] for p in parts.values()) + embed, step_flops(model, b), rel_tol=1e-9)
    base = r["baseline"]
    assert base["dim"] == cfg.model.vlm.dim and base["n_layers"] == cfg.model.vlm.n_layers and base["mfu"] > 0


def test_back_to_back_flops_of_padded_batches_count_each_real_token_once():
    """The profile's FLOPs of a packed batch with padding are monitor.step_flops of it: step_flops
    already counts real tokens only, so scaling it by the slot fill again (the old profile did, in
    the synced and the back-to-back figures alike) under-counted real data's MFU by its padding."""
    from megaflow.model.starflow import STARFlow2
    from megaflow.monitor import step_flops
    from tests.helpers import make_batch, tiny_config
    from tools.profile_step import loop_time
    cfg = tiny_config()
    with torch.device("meta"):
        model = STARFlow2(cfg)
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    assert (batch["doc_ids"] < 0).any()  # padding in row 1
    _, flops, host, prep = loop_time(lambda wait: (0.0, batch, None, 0.0), lambda: None, 3, model)
    assert flops == step_flops(model, batch) and len(host) == 3 and len(prep) == 3


def test_parts_count_real_tokens_and_document_attention_of_packed_batches():
    """--parts on a packed batch with padding and two documents in a row: the parts' FLOPs (+ the
    embeddings' matmuls over the real tokens) are monitor.step_flops of the batch, as for synthetic rows."""
    from megaflow.model.starflow import build_model
    from megaflow.monitor import step_flops
    from tests.helpers import make_batch, tiny_config
    from tools.profile_parts import measure_parts
    cfg = tiny_config()
    model = build_model(cfg)
    batch = make_batch(cfg, batch_size=2, seq_len=48)
    real = int((batch["doc_ids"] >= 0).sum())
    assert real < batch["tokens"].numel() and int(batch["doc_ids"][0].max()) == 1
    parts = measure_parts(model, batch, None, torch.device("cpu"), 1e12, 1.0, repeats=1)["parts"]
    embed = 6.0 * sum(p.numel() for n, p in model.named_parameters()
                      if p.dim() == 2 and n.startswith(("adapter.", "flow_in."))) * real
    assert math.isclose(sum(p["flops"] for p in parts.values()) + embed, step_flops(model, batch), rel_tol=1e-9)


def test_real_data_baseline_adds_the_llama_over_the_packed_rows(tmp_path, capsys):
    """--real-data --baseline: beside the Llama on unpacked rows, the same Llama over the layouts of the
    config's own packed batches (document masks; MFU over their real tokens and documents), printed and in --json."""
    out = tmp_path / "r.json"
    assert main(["--config", "configs/tiny.yaml", "--device", "cpu", "--warmup", "1", "--steps", "1", "--real-data",
                 "--baseline", "--peak-tflops", "1", "--json", str(out)]) == 0
    assert "on the packed rows" in capsys.readouterr().out
    r = json.loads(out.read_text())
    packed, plain = r["baseline_packed"], r["baseline"]
    assert packed["packed"] and not plain["packed"] and packed["mfu"] > 0
    assert packed["tokens_per_s"] * packed["step_time_s"] <= packed["rows"] * packed["seq_len"]  # real tokens only


def test_variants_of_different_compile_modes_get_a_note(capsys):
    """Variants that differ in train.compile_mode are named in a note (a later mode's row in the same
    process measured 24% slower on the H200 than alone); one mode across the variants gets none."""
    from argparse import Namespace
    from tools.profile_step import parse_variant, warn_mixed_compile_modes
    args = Namespace(config="configs/tiny.yaml", overrides=[])
    mixed = [parse_variant(v) for v in ("a=", "b=train.compile_mode=tuned", "bad=train.compile_mode=fast")]
    assert warn_mixed_compile_modes(args, mixed) == ["default", "tuned"]
    assert "differ in train.compile_mode (default, tuned)" in capsys.readouterr().out
    same = [parse_variant(v) for v in ("a=", "ac=train.activation_checkpointing=full")]
    assert warn_mixed_compile_modes(args, same) == ["default", "default"]
    assert "note:" not in capsys.readouterr().out
