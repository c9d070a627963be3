"""LinearRule against microbatching: any leading dims, frozen parameters, edge batch sizes, low precision."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastdp.ops.linear as linear_ops
from fastdp.engine.rules import get_rule
from fastdp.engine.rules.linear import LinearRule

from .rule_testing import check_empty_batch, check_rule, norm_method  # noqa: F401  (fixture)


def test_registered_for_linear_and_subclasses():
    class MyLinear(nn.Linear):
        pass

    assert isinstance(get_rule(nn.Linear(2, 3)), LinearRule)
    assert isinstance(get_rule(MyLinear(2, 3)), LinearRule)


@pytest.mark.parametrize(
    "input_shape",
    [(3, 5), (1, 5), (3, 1, 5), (3, 4, 5), (2, 3, 4, 5), (1, 2, 1, 3, 5)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_microbatching(input_shape, bias, norm_method):
    torch.manual_seed(0)
    check_rule(nn.Linear(5, 7, bias=bias), torch.randn(input_shape), bilinear=True)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    leading=st.lists(st.integers(1, 4), max_size=2),
    d=st.integers(1, 9),
    p=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_with_cost_model(batch, leading, d, p, seed):
    torch.manual_seed(seed)
    check_rule(nn.Linear(d, p), torch.randn(batch, *leading, d), bilinear=True)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameter(frozen, norm_method):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    getattr(layer, frozen).requires_grad_(False)
    check_rule(layer, torch.randn(3, 5, 6), bilinear=True)


def test_frozen_weight_costs_nothing(monkeypatch):
    """Only the bias part is computed: no weight op may run."""

    def forbidden(*args):
        raise AssertionError("weight op called for a frozen weight")

    for name in ("linear_weight_norm_sq", "linear_clipped_grad", "linear_grad_sample"):
        monkeypatch.setattr(linear_ops, name, forbidden)
    layer = nn.Linear(6, 4)
    layer.weight.requires_grad_(False)
    check_rule(layer, torch.randn(3, 5, 6), bilinear=True)


@pytest.mark.parametrize("input_shape", [(0, 5), (0, 3, 5)])
@pytest.mark.parametrize("frozen_bias", [False, True])
def test_empty_batch(input_shape, frozen_bias):
    layer = nn.Linear(5, 3)
    layer.bias.requires_grad_(not frozen_bias)
    check_empty_batch(layer, torch.randn(input_shape))


def test_bf16_norms_are_fp32_and_close_to_fp32_result():
    """bf16 layer and activations: fp32 norms within 3e-2 relative of the fp32 layer's (input rounding only)."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x, grad_output = torch.randn(4, 10, 32), torch.randn(4, 10, 16)
    rule = get_rule(layer)
    expected = rule.norm_sq(layer, (x,), grad_output)
    layer16 = nn.Linear(32, 16).bfloat16()
    norms = rule.norm_sq(layer16, (x.bfloat16(),), grad_output.bfloat16())
    assert norms.dtype == torch.float64  # upper bounds (fastdp.ops.rounding)
    torch.testing.assert_close(norms, expected, rtol=3e-2, atol=0)
    clipped = rule.clipped_grad(layer16, (x.bfloat16(),), grad_output.bfloat16(), torch.rand(4))
    assert {g.dtype for g in clipped.values()} == {torch.bfloat16}


def test_autocast_style_mixed_dtypes():
    """fp32 recorded input with a bf16 output gradient (autocast) gives fp32 gradients."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x, grad_output = torch.randn(3, 8), torch.randn(3, 4)
    rule = get_rule(layer)
    c = torch.rand(3)
    expected = rule.clipped_grad(layer, (x,), grad_output.bfloat16().float(), c)
    mixed = rule.clipped_grad(layer, (x,), grad_output.bfloat16(), c)
    for name in expected:
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], expected[name], rtol=1e-5, atol=1e-6)
