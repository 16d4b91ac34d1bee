"""Document-masked attention (megaflow/model/masks.py): the FlexAttention path equals the dense-mask
path (fp32, 1e-5) on packed batches with several documents, padding and image slots, in both
streams: hidden states after every unit, logits, Gaussian parameters and the loss terms; and, where
FlexAttention has a backward (CUDA), the gradients of every parameter (max difference over
max(1, max |gradient|) of each parameter). torch 2.13 runs
FlexAttention's forward on CPU (eager) but not its backward, so on CPU the gradient test skips and
tools/bench_attention.py checks gradients on the GPU."""
import dataclasses

import pytest
import torch

import torch.nn.functional as F

from megaflow.model.masks import BlockMask, attend, document_mask, explicit_attention, use_kernel
from tests.helpers import make_batch, make_noise, tiny_config
from tests.model.util import randomized_model

pytestmark = [pytest.mark.skipif(BlockMask is None, reason="FlexAttention needs torch >= 2.5"),
              pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")]


def packed_batch(cfg, rows: int = 2, seq_len: int = 128, max_images: int = 4) -> dict:
    """Rows of several documents (1 or 2 images each, from tests.helpers.make_batch) and padding."""
    parts = [make_batch(cfg, batch_size=2, seq_len=48, max_images=2, seed=s, two_docs=False) for s in range(4)]
    docs = []  # (tokens, targets, image_mask, images) of each single document
    for p in parts:
        for b in range(2):
            n = int((p["doc_ids"][b] >= 0).sum())
            k = int(p["image_valid"][b].sum())
            docs.append((p["tokens"][b, :n], p["targets"][b, :n], p["image_mask"][b, :n], p["images"][b, :k]))
    t = cfg.tokens
    out = {"tokens": torch.full((rows, seq_len), t.pad_id), "targets": torch.full((rows, seq_len), -100),
           "position_ids": torch.zeros(rows, seq_len, dtype=torch.long), "doc_ids": torch.full((rows, seq_len), -1),
           "image_mask": torch.zeros(rows, seq_len, dtype=torch.bool),
           "images": torch.zeros(rows, max_images, *docs[0][3].shape[1:]),
           "image_valid": torch.zeros(rows, max_images, dtype=torch.bool)}
    it = iter(docs)
    for r in range(rows):
        offset, n_img, d = 0, 0, 0
        for tokens, targets, image_mask, images in it:
            if offset + len(tokens) > seq_len - 10 or n_img + len(images) > max_images:
                break
            span = slice(offset, offset + len(tokens))
            out["tokens"][r, span], out["targets"][r, span], out["image_mask"][r, span] = tokens, targets, image_mask
            out["position_ids"][r, span], out["doc_ids"][r, span] = torch.arange(len(tokens)), d
            out["images"][r, n_img:n_img + len(images)] = images
            out["image_valid"][r, n_img:n_img + len(images)] = True
            offset, n_img, d = offset + len(tokens), n_img + len(images), d + 1
    assert all(out["doc_ids"][r].max() >= 1 for r in range(rows)) and (out["doc_ids"] < 0).any()
    return out


def _trace(model, batch, noise):
    ctx = model.context(batch)
    state = model.embed(batch, ctx, noise)
    out = []
    for unit in model.units.values():
        state = unit(state, ctx)
        out += [state[0], state[1]]
    out += list(model.flow_params(state[1]))
    if model.lm_head is not None:
        out.append(model.text_logits(state[0]))
    terms = model.loss_terms(state, batch)
    return out + [terms[k] for k in sorted(terms)], ctx


def wide_config(tarflow_only: bool = False):
    """tiny_config with heads of 16 dims in every stream: FlexAttention's compiled kernels refuse
    smaller heads (masks.FLEX_MIN_HEAD_DIM), so only such a model runs the flex kernel itself."""
    cfg = tiny_config(tarflow_only=tarflow_only, dim=64, shallow_dim=32)
    if cfg.vlm is not None:
        cfg = dataclasses.replace(cfg, vlm=dataclasses.replace(cfg.vlm, dim=64))
    return cfg


@pytest.mark.parametrize("block", [128, 64])
def test_attend_flex_equals_dense_with_documents_padding_and_groups(block):
    """One kernel call: 3 documents + padding per row, fp32, 4 query heads over 2 shared k/v heads
    handed over unrepeated (flex reads them in place, the dense path repeats them), and over 4; mask
    blocks of 128 and of 64 tokens (model.mask_block)."""
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 4, 160, 16
    doc_ids = torch.full((B, T), -1)
    doc_ids[0, :50], doc_ids[0, 50:120], doc_ids[0, 120:150] = 0, 1, 2
    doc_ids[1, :100], doc_ids[1, 100:] = 0, 1
    q = torch.randn(B, H, T, hd, generator=g)
    k, v = (torch.randn(B, H // 2, T, hd, generator=g) for _ in range(2))  # (B, Hkv, T, hd)
    with use_kernel("flex"):
        flex_mask = document_mask(doc_ids, T, T, "cpu", block)
    with use_kernel("dense"):
        dense_mask = document_mask(doc_ids, T, T, "cpu", block)
    assert isinstance(flex_mask, BlockMask) and dense_mask.dtype == torch.bool
    assert flex_mask.BLOCK_SIZE == (block, block)
    repeated = [x.repeat_interleave(2, dim=1) for x in (k, v)]  # (B, H, T, hd)
    reference = attend(q, *repeated, dense_mask)
    torch.testing.assert_close(attend(q, k, v, flex_mask), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q, k, v, dense_mask), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q, *repeated, flex_mask), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tarflow_only,block", [(False, 128), (True, 128), (False, 64)])
def test_model_flex_path_equals_dense_path_forward(tarflow_only, block):
    """Both streams, every unit: the same BlockMask object serves every layer of the batch."""
    cfg = dataclasses.replace(wide_config(tarflow_only=tarflow_only), mask_block=block)
    model = randomized_model(cfg, scale=0.2).eval()
    batch = packed_batch(cfg)
    noise = make_noise(cfg, batch)
    with torch.no_grad():
        with use_kernel("dense"):
            dense, dense_ctx = _trace(model, batch, noise)
        with use_kernel("flex"):
            flex, flex_ctx = _trace(model, batch, noise)
    assert isinstance(flex_ctx.flow.mask, BlockMask) and not isinstance(dense_ctx.flow.mask, BlockMask)
    assert flex_ctx.flow.mask.BLOCK_SIZE == (block, block)
    if not tarflow_only:
        assert flex_ctx.vlm.mask is flex_ctx.flow.mask  # built once per batch, shared by both streams
    for a, b in zip(flex, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FlexAttention has no backward on CPU in torch 2.13; tools/bench_attention.py checks "
                           "flex == dense gradients on the GPU")
@pytest.mark.parametrize("block", [128, 64])
def test_model_flex_path_equals_dense_path_gradients(block):
    """64-token blocks run FlexAttention's compiled backward with masks.FLEX_TILES's tiles."""
    cfg = dataclasses.replace(wide_config(), mask_block=block)
    model = randomized_model(cfg, scale=0.2).cuda()
    batch = {k: v.cuda() for k, v in packed_batch(cfg).items()}
    noise = make_noise(cfg, batch).cuda()
    grads = {}
    for kernel in ("dense", "flex"):
        model.zero_grad()
        with use_kernel(kernel):
            loss, _ = model(batch, noise)
        loss.backward()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    worst = max(((grads["flex"][n] - g).abs().max().item() / max(1.0, g.abs().max().item()), n)
                for n, g in grads["dense"].items())
    assert worst[0] <= 1e-5, f"flex and dense gradients differ by {worst[0]:.2e} (relative to scale) in {worst[1]}"


def test_mask_block_must_be_128_or_64():
    with pytest.raises(ValueError, match="mask_block=96"):
        dataclasses.replace(wide_config(), mask_block=96)
    with use_kernel("flex"), pytest.raises(ValueError, match="mask block 32"):
        document_mask(torch.zeros(1, 64, dtype=torch.long), 64, 64, "cpu", 32)


def test_heads_too_small_for_flex_fall_back_to_the_same_rule():
    """head_dim 8 (< FLEX_MIN_HEAD_DIM): a BlockMask still gives exactly the dense mask's attention
    (built from its mask_mod), where FlexAttention's kernels would refuse the heads."""
    g = torch.Generator().manual_seed(1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [-1] * 14, [0] * 64])
    q, k, v = (torch.randn(2, 4, 64, 8, generator=g) for _ in range(3))
    with use_kernel("flex"):
        flex_mask = document_mask(doc_ids, 64, 64, "cpu")
    with use_kernel("dense"):
        dense_mask = document_mask(doc_ids, 64, 64, "cpu")
    assert isinstance(flex_mask, BlockMask)
    torch.testing.assert_close(attend(q, k, v, flex_mask), attend(q, k, v, dense_mask), rtol=1e-6, atol=1e-6)


def test_cpu_default_and_cached_generation_stay_dense():
    """On CPU (auto) and with a KV cache (q_len < k_len) the exact dense mask is used."""
    doc_ids = torch.zeros(1, 8, dtype=torch.long)
    assert document_mask(doc_ids, 8, 8, "cpu").dtype == torch.bool
    with use_kernel("flex"):
        assert document_mask(doc_ids, 2, 8, "cpu").shape == (1, 1, 2, 8)
    assert document_mask(None, 8, 8, "cpu") is None


def test_compiled_flex_is_made_once_and_survives_compiled_callers():
    """Issue 17: the compiled FlexAttention used by eager forwards on CUDA is made at import. It was
    made lazily inside `_flex`; when dynamo traced a compiled block through `_flex`, it turned that
    `torch.compile(flex_attention)` into plain `flex_attention` and stored it in the global, so every
    later eager call (evaluation, compile-off layouts) ran FlexAttention's slow reference path. The
    same mechanism on a stand-in global below, then the module's own wrapper."""
    from megaflow.model import masks
    box = {}

    def lazily_compiled(x):
        if "fn" not in box:
            box["fn"] = torch.compile(torch.sin, dynamic=False)
        return box["fn"](x)

    torch.compile(lazily_compiled, backend="eager")(torch.randn(3))
    assert box["fn"] is torch.sin  # what a lazily made wrapper becomes under a compiled caller
    if masks.flex_attention is not None:
        assert getattr(masks._compiled_flex, "_torchdynamo_orig_callable", None) is masks.flex_attention


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_bf16_attention_is_explicit_and_equals_sdpa(masked):
    """bf16 on CPU runs `explicit_attention` (matmuls + fp32 softmax, faster than SDPA's flash kernel
    there): in fp32 it equals SDPA (1e-5), forward and input gradients, plain causal and under a
    document mask with padding; in bf16 `attend` takes it and stays within bf16 rounding of fp32 SDPA."""
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 2, 24, 16
    doc_ids = torch.full((B, T), -1)
    doc_ids[0, :10], doc_ids[0, 10:20], doc_ids[1, :] = 0, 1, 0
    mask = document_mask(doc_ids, T, T, "cpu") if masked else None
    q, k, v = (torch.randn(B, H, T, hd, generator=g, requires_grad=True) for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask)

    ref = sdpa(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = explicit_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (q, k, v)), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    assert torch.equal(attend(qb, kb, vb, mask), explicit_attention(qb, kb, vb, mask))
    torch.testing.assert_close(attend(qb, kb, vb, mask).float(), sdpa(qb.float(), kb.float(), vb.float()),
                               rtol=0.03, atol=0.03)
