"""fastdp.ops.linear against per-sample gradients of nn.Linear from microbatching, and the cost model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastdp.ops.linear as linear_ops

from .rule_testing import assert_within, grads_and_scales

# (B, T, d, p, seed)
linear_cases = st.tuples(
    st.integers(1, 4), st.integers(1, 6), st.integers(1, 7), st.integers(1, 7), st.integers(0, 2**31 - 1)
)


def random_case(B, T, d, p, seed):
    """a, g and, from microbatching nn.Linear, per-sample grads and their scales (see assert_within)."""
    torch.manual_seed(seed)
    a, g = torch.randn(B, T, d), torch.randn(B, T, p)
    grads, scales = grads_and_scales(nn.Linear(d, p), a, g)
    return a, g, grads, scales


@settings(max_examples=40, deadline=None)
@given(linear_cases)
def test_ops_match_microbatching(case):
    a, g, grads, scales = random_case(*case)
    weight_norms = grads["weight"].double().square().sum((1, 2))
    weight_norm_scales = scales["weight"].double().square().sum((1, 2))
    for norm_op in (linear_ops.linear_norm_sq_ghost, linear_ops.linear_norm_sq_direct):
        norms = norm_op(a, g)
        assert norms.dtype == torch.float64  # upper bounds (fastdp.ops.rounding)
        assert_within(norms, weight_norms, weight_norm_scales)
    bias_norms = grads["bias"].double().square().sum(1)
    assert_within(linear_ops.linear_bias_norm_sq(g), bias_norms, scales["bias"].double().square().sum(1))
    c = torch.rand(a.shape[0])
    assert_within(
        linear_ops.linear_clipped_grad(a, g, c),
        torch.einsum("b,bpd->pd", c, grads["weight"]),
        torch.einsum("b,bpd->pd", c, scales["weight"]),
    )
    assert_within(linear_ops.linear_bias_clipped_grad(g, c), c @ grads["bias"], c @ scales["bias"])
    assert_within(linear_ops.linear_grad_sample(a, g), grads["weight"], scales["weight"])


@pytest.mark.parametrize("norm_op", [linear_ops.linear_norm_sq_ghost, linear_ops.linear_norm_sq_direct])
def test_chunked_norms_equal_unchunked(norm_op, monkeypatch):
    a, g = torch.randn(7, 5, 6), torch.randn(7, 5, 4)
    whole = norm_op(a, g)
    monkeypatch.setattr(linear_ops, "CHUNK_NUMEL", 1)  # one sample per chunk
    torch.testing.assert_close(norm_op(a, g), whole, rtol=1e-6, atol=0)


def test_non_contiguous_inputs():
    a, g, grads, scales = random_case(3, 5, 4, 6, seed=1)
    a_t, g_t = a.mT.contiguous().mT, g.mT.contiguous().mT  # same values, transposed strides
    norm_scales = scales["weight"].square().sum((1, 2))
    for norm_op in (linear_ops.linear_norm_sq_ghost, linear_ops.linear_norm_sq_direct):
        assert_within(norm_op(a_t, g_t), grads["weight"].square().sum((1, 2)), norm_scales)
    c = torch.rand(3)
    assert_within(
        linear_ops.linear_clipped_grad(a_t, g_t, c),
        torch.einsum("b,bpd->pd", c, grads["weight"]),
        torch.einsum("b,bpd->pd", c, scales["weight"]),
    )


def test_empty_batch():
    a, g, c = torch.randn(0, 3, 5), torch.randn(0, 3, 4), torch.ones(0)
    for norm_op in (linear_ops.linear_norm_sq_ghost, linear_ops.linear_norm_sq_direct, linear_ops.linear_bias_norm_sq):
        args = (g,) if norm_op is linear_ops.linear_bias_norm_sq else (a, g)
        assert norm_op(*args).shape == (0,)
    assert torch.equal(linear_ops.linear_clipped_grad(a, g, c), torch.zeros(4, 5))
    assert torch.equal(linear_ops.linear_bias_clipped_grad(g, c), torch.zeros(4))
    assert linear_ops.linear_grad_sample(a, g).shape == (0, 4, 5)


@pytest.mark.parametrize("T", [1, 16])
def test_bf16_norms_accumulate_in_fp32(T):
    """bf16 inputs: fp32 norms, exact (1e-5) for the rounded inputs, within 3e-2 of the unrounded fp32 result.

    The 3e-2 is the effect of rounding the inputs to bf16 (8-bit mantissa, ~4e-3 per element)
    on a squared norm; accumulating in bf16 instead would be off by far more for T·d terms.
    """
    torch.manual_seed(0)
    a, g = torch.randn(4, T, 64), torch.randn(4, T, 48)
    a16, g16 = a.bfloat16(), g.bfloat16()
    for norm_op in (linear_ops.linear_norm_sq_ghost, linear_ops.linear_norm_sq_direct):
        norms = norm_op(a16, g16)
        assert norms.dtype == torch.float64  # upper bounds (fastdp.ops.rounding)
        torch.testing.assert_close(norms, norm_op(a16.float(), g16.float()), rtol=1e-5, atol=0)
        torch.testing.assert_close(norms, norm_op(a, g), rtol=3e-2, atol=0)
    bias_norms = linear_ops.linear_bias_norm_sq(g16)
    assert bias_norms.dtype == torch.float64
    torch.testing.assert_close(bias_norms, linear_ops.linear_bias_norm_sq(g), rtol=3e-2, atol=0)


def test_cost_model():
    choose = linear_ops.choose_linear_norm_method
    # short sequences into wide layers: T·(d+p) < p·d, the T×T Gram is cheap
    assert choose(B=32, T=128, d=4096, p=4096) == "ghost"
    assert choose(B=32, T=512, d=768, p=3072) == "ghost"
    # long sequences (or conv feature maps) into narrow layers: forming G_i is cheaper
    assert choose(B=32, T=4096, d=768, p=768) == "direct"
    assert choose(B=32, T=56 * 56, d=64 * 9, p=64) == "direct"
    # the boundary T·(d+p) == p·d goes to direct
    assert choose(B=1, T=2, d=4, p=4) == "direct"
    # T = 1 is the Goodfellow product, however narrow the layer
    assert choose(B=8, T=1, d=1, p=1) == "ghost"
    assert choose(B=8, T=1, d=1024, p=10) == "ghost"


@pytest.mark.parametrize("T, expected", [(1, "ghost"), (2, "ghost"), (200, "direct")])
def test_weight_norm_uses_the_cost_model(T, expected, monkeypatch):
    calls = []
    for method in ("ghost", "direct"):
        reference = getattr(linear_ops, f"linear_norm_sq_{method}")
        monkeypatch.setattr(
            linear_ops, f"linear_norm_sq_{method}",
            lambda a, g, mass=None, m=method, f=reference: calls.append(m) or f(a, g, mass=mass),
        )
    linear_ops.linear_weight_norm_sq(torch.randn(2, T, 32), torch.randn(2, T, 32))
    assert calls == [expected]


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d-layout"])
@pytest.mark.parametrize(
    "B, T, d, p, min_scaled",
    [(5, 3, 7, 6, None), (6, 40, 9, 300, 512), (40, 1, 5, 130, 256), (3, 200, 4, 70, 64)],
    ids=["one-block", "feature-blocks", "feature-blocks-T1", "sample-chunks"],
)
def test_in_place_clipped_sum_adds_the_clipped_sum_in_blocks(B, T, d, p, min_scaled, transposed, monkeypatch):
    """out += Σ_i c_i g_iᵀ a_i in place, in blocks of output features (and of samples when one sample's block
    would exceed the scratch budget): the same sum as one float64 product, added to what out held."""
    if min_scaled is not None:
        monkeypatch.setattr(linear_ops, "MIN_SCALED_NUMEL", min_scaled)
    gen = torch.Generator().manual_seed(B * 1000 + T)
    a, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
    c = torch.rand(B, generator=gen)
    start = torch.randn(p, d, generator=gen)
    expected = start.double() + torch.einsum("b,btp,btd->pd", c.double(), g.double(), a.double())
    out = start.T.contiguous() if transposed else start.clone()
    linear_ops.add_linear_clipped_grad(out, a, g, c, transposed=transposed)
    torch.testing.assert_close((out.T if transposed else out).double(), expected, rtol=1e-5, atol=1e-5)
