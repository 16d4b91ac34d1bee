"""Issue 14, compiled decode steps (CPU): with a compile backend forced (`compile_steps`), every
graph-shaped step (one-token image and text steps, shallow-block steps, Jacobi windows of both
flows) runs its transformer layers through the one compiled layer function, and samples what the
eager steps sample (images 1e-5, text exactly). A counting backend proves the compiled path ran
(one graph per layer shape and row count, not one per layer); a failing backend falls back to eager
steps with a warning and the same samples. Jacobi in graph shapes (every window attending to all
cache slots) equals sequential sampling when it runs to exactness (tol < 0)."""
import pytest
import torch

from megaflow.model.decoding import compile_steps
from megaflow.model.generate import sample_images, sample_text
from megaflow.model.layers import TransformerBlock
from tests.helpers import SPECIAL, tiny_config
from tests.model.util import randomized_model

PROMPTS = [[SPECIAL.bos_id, 5, 6, 7], [SPECIAL.bos_id, 9]]


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("method", ["sequential", "jacobi"])
def test_compiled_steps_sample_what_eager_steps_sample(method):
    model = randomized_model(tiny_config(), scale=0.1)
    backend = Counting()
    kw = dict(guidance=2.0, seed=3, method=method, tol=-1.0, chunk=8)  # tol < 0: Jacobi runs to exactness
    eager, _ = sample_images(model, PROMPTS, graphs=False, **kw)
    with compile_steps(backend):
        fast, dec = sample_images(model, PROMPTS, graphs=True, **kw)
        text = sample_text(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=2, graphs=True)
    assert backend.graphs >= 2, "no layer went through the compiled function"
    n_layers = sum(isinstance(m, TransformerBlock) for m in model.modules())
    assert backend.graphs < n_layers, f"{backend.graphs} graphs for {n_layers} layers: one per layer, not per shape"
    assert (eager - fast).abs().max() < 1e-5
    assert text == sample_text(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=2, graphs=False)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, TransformerBlock)), \
        "the layers' own forwards were not restored"
    if method == "jacobi":
        N = model.cfg.fae.n_tokens
        assert dec.stats["deep"] == N - 2 and dec.stats["shallow"] == [N - 2] * 2, dec.stats  # 2 windows of 8
        sequential, _ = sample_images(model, PROMPTS, guidance=2.0, seed=3, graphs=False)
        assert (sequential - fast).abs().max() < 1e-5


def test_failing_compiler_falls_back_to_eager_steps():
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    model = randomized_model(tiny_config(tarflow_only=True), scale=0.1)
    prompts = [[SPECIAL.bos_id, 5], [SPECIAL.bos_id, 9]]
    eager, _ = sample_images(model, prompts, seed=1, graphs=False)
    with compile_steps(broken), pytest.warns(UserWarning, match="running eagerly"):
        fast, _ = sample_images(model, prompts, seed=1, graphs=True)
    assert (eager - fast).abs().max() < 1e-5


def test_bf16_model_samples_in_graph_shaped_steps():
    """bf16 weights (the GPU's sampling dtype): the flow's variables stay fp32 (decoder buffers,
    noise, shallow inverse), so the graph-shaped steps, sequential and Jacobi, write them without a
    dtype clash, and sample what the eager steps sample up to bf16 rounding."""
    model = randomized_model(tiny_config(), scale=0.1).to(torch.bfloat16)
    eager, dec = sample_images(model, PROMPTS, guidance=2.0, seed=3, graphs=False)
    assert dec.flow_x.dtype == torch.float32 and eager.dtype == torch.bfloat16
    with compile_steps(Counting()):
        for method in ("sequential", "jacobi"):
            fast, _ = sample_images(model, PROMPTS, guidance=2.0, seed=3, graphs=True, method=method, tol=-1.0)
            assert torch.isfinite(fast).all() and (eager.float() - fast.float()).abs().max() < 0.1, method
        assert sample_text(model, PROMPTS, max_new_tokens=4, seed=2, graphs=True)
