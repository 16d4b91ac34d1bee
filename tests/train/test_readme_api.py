"""The README's Python API section runs as written (on the tiny trained run instead of
runs/default): build a model from a config, compute the losses of a batch, load a checkpoint,
generate an image from text and answer about it."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_api_runs(tiny_run, tiny_sets):
    text = README.read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "sample_images" in code and "load_for_inference" in code and "build_model" in code
    code = code.replace('"runs/default"', repr(str(tiny_run)))
    code = code.replace('"configs/default.yaml"', repr(str(README.parent / "configs" / "default.yaml")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, images, answer, tok = scope["model"], scope["images"], scope["answer"], scope["tok"]
    fae = model.cfg.fae
    assert images.shape == (4, fae.channels, fae.image_size, fae.image_size)
    assert images.min() >= -1 and images.max() <= 1
    assert isinstance(tok.decode(answer[0]), str) and len(answer[0]) > 0
    # the loss line of the README, on a batch of the tiny run's data
    from megaflow.config import load_config
    from data_pipeline.loader import build_loader
    from megaflow.train import step_randomness
    cfg = load_config(str(README.parent / "configs" / "tiny.yaml"), tiny_sets)
    with build_loader(cfg.data, tok, 0, 1) as loader:
        batch = next(iter(loader))
    noise, cond_keep = step_randomness(cfg, model.cfg, batch, 0, 0, "cpu")
    loss, metrics = model(batch, noise, cond_keep)
    assert torch.isfinite(loss) and {"text_loss", "flow_nll", "bits_per_dim"} <= set(metrics)
