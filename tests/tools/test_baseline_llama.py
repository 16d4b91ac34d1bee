"""tools/baseline_llama.py over packed rows (`megaflow profile --real-data --baseline`): each document of a
packed row sees only itself, exactly as if it ran alone (positions restarting at its first token), padding
included in no document's attention; its FLOPs count real tokens and each document's own attention; a short
training run over given layouts reports them (CPU: the dense-mask path the CUDA BlockMask stands for)."""
from __future__ import annotations

import torch

from megaflow.monitor import piece_lengths
from tools.baseline_llama import Llama, run_baseline


def test_packed_rows_equal_their_documents_alone_and_count_their_own_flops():
    torch.manual_seed(0)
    model = Llama(vocab=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64).eval()
    tokens = torch.randint(0, 50, (2, 14))
    doc_ids = torch.tensor([[0] * 5 + [1] * 6 + [-1] * 3, [0] * 14])
    with torch.no_grad():
        packed = model.hidden(tokens, doc_ids)
        for row, start, stop in ((0, 0, 5), (0, 5, 11), (1, 0, 14)):
            alone = model.hidden(tokens[row:row + 1, start:stop])  # plain causal, positions 0..L-1
            torch.testing.assert_close(packed[row:row + 1, start:stop], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(packed[0:1, 5:11], model.hidden(tokens[0:1, :11])[:, 5:11], atol=1e-3)
    assert piece_lengths(doc_ids).tolist() == [5, 6, 14]  # the documents the FLOPs below count
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("embed"))
    want = 6.0 * matmul * (11 + 14) + 12.0 * 2 * 4 * 8 * (5 ** 2 + 6 ** 2 + 14 ** 2)  # layers x heads x head_dim
    assert model.flops_per_step(2, 14, doc_ids) == want
    assert model.flops_per_step(2, 14) == 6.0 * matmul * 28 + 12.0 * 2 * 4 * 8 * 2 * 14 ** 2


def test_run_baseline_over_packed_layouts_reports_real_tokens():
    layouts = [torch.tensor([[0] * 6 + [1] * 6 + [-1] * 4, [0] * 16]), torch.tensor([[0] * 16, [0] * 3 + [1] * 13])]
    out = run_baseline(vocab=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, rows=2, seq_len=16,
                       device=torch.device("cpu"), steps=2, warmup=1, compile=False, peak_flops=1e12,
                       doc_ids=layouts)
    assert out["packed"] and "packed rows" in out["name"] and out["mfu"] > 0
    assert torch.isfinite(torch.tensor(out["last_loss"]))
    real = sorted(int((d >= 0).sum()) for d in layouts)  # 28 and 32: the median of the steps' real tokens
    assert abs(out["tokens_per_s"] * out["step_time_s"] - (real[0] + real[1]) / 2) < 1e-6
