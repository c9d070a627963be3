"""Triton embedding kernels (kernels/embedding.py) against the torch reference and microbatching, on CPU.

Tolerances: fp32 grads 1e-5 relative. bf16/fp16 grads are exact in the fp32 accumulator, so
results are held to 1e-5 as well against the reference on the same rounded values.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import fastdp.kernels.embedding as embedding_kernels  # noqa: E402
from fastdp.ops import embedding as embedding_ops  # noqa: E402
from fastdp.ops import select_impl  # noqa: E402

from .microbatch import microbatch_grad_sample, split_batch  # noqa: E402
from .rule_testing import assert_norm_bounds  # noqa: E402


def token_list(batch, tokens_per_sample, vocab, dim, seed, dtype=torch.float32, shuffle=True):
    """Random token list with many repeats (small vocabulary), samples interleaved when shuffled."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch * tokens_per_sample,), generator=generator)
    sample_of_token = torch.arange(batch).repeat_interleave(tokens_per_sample)
    if shuffle:
        order = torch.randperm(ids.numel(), generator=generator)
        ids, sample_of_token = ids[order], sample_of_token[order]
    grads = torch.randn(ids.numel(), dim, generator=generator).to(dtype)
    return ids, sample_of_token, grads


def assert_close(actual, expected, rtol=1e-5):
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    floor = rtol * expected.double().abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=floor)


def check_all_ops(ids, sample_of_token, grads, batch, vocab, padding_idx):
    """All three kernels against the torch reference run in float64 on the same values."""
    exact = grads.double()
    clip_factors = torch.rand(batch)
    assert_norm_bounds(  # both upper bounds (fastdp.ops.rounding); the reference's, in float64, ≈ exact
        embedding_kernels.embedding_norm_sq(ids, sample_of_token, grads, batch, vocab, padding_idx),
        embedding_ops.embedding_norm_sq.torch_reference(ids, sample_of_token, exact, batch, vocab, padding_idx),
        rtol=1e-4,
    )
    assert_close(
        embedding_kernels.embedding_clipped_grad(ids, sample_of_token, grads, clip_factors, vocab, padding_idx),
        embedding_ops.embedding_clipped_grad.torch_reference(
            ids, sample_of_token, exact, clip_factors.double(), vocab, padding_idx
        ),
    )
    assert_close(
        embedding_kernels.embedding_grad_sample(ids, sample_of_token, grads, batch, vocab, padding_idx),
        embedding_ops.embedding_grad_sample.torch_reference(ids, sample_of_token, exact, batch, vocab, padding_idx),
    )


# (B, tokens per sample, vocab, D, padding_idx): repeats everywhere; D below, at and above
# one 16-token × 128-column tile; a segment longer than one token tile (30 repeats of 6 ids)
CASES = [
    (3, 7, 10, 5, -1),
    (3, 7, 10, 5, 2),
    (1, 1, 5, 1, -1),
    (2, 30, 6, 24, 0),
    (3, 12, 50, 17, 49),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    batch, tokens, vocab, dim, padding_idx = case
    ids, sample_of_token, grads = token_list(batch, tokens, vocab, dim, seed=sum(case))
    check_all_ops(ids, sample_of_token, grads, batch, vocab, padding_idx)


def test_wide_rows_span_several_column_tiles(monkeypatch):
    monkeypatch.setattr(embedding_kernels, "MAX_BLOCK_D", 8)
    ids, sample_of_token, grads = token_list(2, 20, 7, 21, seed=5)
    check_all_ops(ids, sample_of_token, grads, 2, 7, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    ids, sample_of_token, grads = token_list(3, 9, 8, 12, seed=7, dtype=dtype)
    check_all_ops(ids, sample_of_token, grads, 3, 8, 1)


def test_samples_without_tokens_and_padding_only():
    """Sample 1 has no tokens and sample 2 only padding tokens: both must get a zero norm."""
    ids = torch.tensor([4, 4, 1, 0, 0, 2])
    sample_of_token = torch.tensor([0, 0, 3, 2, 2, 3])
    grads = torch.randn(6, 3)
    norms = embedding_kernels.embedding_norm_sq(ids, sample_of_token, grads, 4, 5, 0)
    assert norms[1] == 0 and norms[2] == 0
    assert_norm_bounds(norms[:1], (grads[0] + grads[1]).square().sum()[None], rtol=1e-4)  # repeated token: the sum's norm
    check_all_ops(ids, sample_of_token, grads, 4, 5, 0)


def test_module_matches_microbatching():
    """End to end through nn.Embedding with padding_idx: per-sample grads from one-sample autograd."""
    torch.manual_seed(11)
    module = nn.Embedding(9, 6, padding_idx=2)
    ids = torch.randint(0, 9, (3, 8))
    ids[0, :3] = 2
    ids[1, :4] = 5  # repeated token
    grad_output = torch.randn(3, 8, 6)
    expected = microbatch_grad_sample(module, split_batch(ids), list(grad_output.split(1)))["weight"]
    flat_ids, sample_of_token = ids.reshape(-1), torch.arange(3).repeat_interleave(8)
    token_grads = grad_output.reshape(-1, 6)
    grads = embedding_kernels.embedding_grad_sample(flat_ids, sample_of_token, token_grads, 3, 9, 2)
    torch.testing.assert_close(grads, expected)
    norms = embedding_kernels.embedding_norm_sq(flat_ids, sample_of_token, token_grads, 3, 9, 2)
    assert_norm_bounds(norms, expected.square().sum((1, 2)), rtol=1e-4)
    clip_factors = torch.rand(3)
    clipped = embedding_kernels.embedding_clipped_grad(flat_ids, sample_of_token, token_grads, clip_factors, 9, 2)
    torch.testing.assert_close(clipped, torch.einsum("b,bvd->vd", clip_factors, expected))


def test_dispatch_fallbacks_and_empty(monkeypatch):
    ids, sample_of_token, grads = token_list(2, 4, 6, 3, seed=1)
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    for name in ("embedding_norm_sq", "embedding_clipped_grad", "embedding_grad_sample"):
        assert select_impl(name, ids) is getattr(embedding_kernels, name)
    expected = embedding_ops.embedding_norm_sq.torch_reference(ids, sample_of_token, grads.double(), 2, 6, -1)
    torch.testing.assert_close(embedding_kernels.embedding_norm_sq(ids, sample_of_token, grads.double(), 2, 6, -1),
                               expected)
    none = ids[:0]
    assert torch.equal(embedding_kernels.embedding_norm_sq(none, none, grads[:0], 2, 6, -1), torch.zeros(2))
    assert torch.equal(embedding_kernels.embedding_clipped_grad(none, none, grads[:0], torch.ones(2), 6, -1),
                       torch.zeros(6, 3))
    assert torch.equal(embedding_kernels.embedding_grad_sample(none, none, grads[:0], 2, 6, -1), torch.zeros(2, 6, 3))


def test_bad_input():
    ids, sample_of_token, grads = token_list(2, 4, 6, 3, seed=1)
    too_large = ids.clone()
    too_large[0] = 5
    with pytest.raises(ValueError, match="num_embeddings=5"):
        embedding_kernels.embedding_norm_sq(too_large, sample_of_token, grads, 2, 5, -1)
    with pytest.raises(ValueError, match="batch_size=1"):
        embedding_kernels.embedding_grad_sample(ids, sample_of_token, grads, 1, 6, -1)
    with pytest.raises(ValueError, match="token_grads"):
        embedding_kernels.embedding_clipped_grad(ids, sample_of_token, grads[:-1], torch.ones(2), 6, -1)
