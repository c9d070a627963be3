"""Shared checks for layer rules: everything a rule returns against one-sample-at-a-time autograd."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import pytest
import torch
from torch import nn

import fastdp.ops.linear as linear_ops
from fastdp.engine.rules import get_rule
from .microbatch import microbatch_grad_sample, split_batch


def without_rounding_bounds(monkeypatch) -> None:
    """Take the rounding bounds out of every norm and clipped sum (``fastdp.ops.rounding``), so that a test
    can show what they guard against: norms become the computed values, slacks zero."""
    from fastdp.engine.rules.base import LayerRule
    from fastdp.ops import rounding

    monkeypatch.setattr(rounding, "ghost_norm_sq_upper", lambda value, *args: value.clamp(min=0))
    monkeypatch.setattr(rounding, "direct_norm_sq_upper", lambda value, *args: value)
    monkeypatch.setattr(rounding, "cross_inner_upper", lambda value, *args: value)
    monkeypatch.setattr(rounding, "clipped_sum_error", lambda *args, **kwargs: 0.0)
    monkeypatch.setattr(rounding, "round_up_float32", lambda x: x.float())
    for rule_class in {type(rule) for rule in _all_rules()}:
        if "rounding_slack" in vars(rule_class):
            monkeypatch.setattr(rule_class, "rounding_slack", LayerRule.rounding_slack)


def _all_rules():
    from fastdp.engine import rules

    return list(rules._RULES.values()) + list(rules._RULES_BY_NAME.values())


#: how far above the exact norm the engine's upper bounds may lie for random (non-cancelling) data:
#: the fp32 rounding bounds of fastdp.ops.rounding, relative to the samples' term mass
BOUND_RTOL = 1e-4


def assert_norm_bounds(actual: torch.Tensor, expected: torch.Tensor, rtol: float = BOUND_RTOL, atol: float = 1e-7) -> None:
    """The engine's per-sample norms are upper bounds (``fastdp.ops.rounding``): at least the reference
    (up to the reference's own float32 rounding) and at most ``rtol`` above it."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    low = (actual - expected * (1 - 1e-6) + atol).min()
    assert low >= 0, f"a norm below its reference: {(actual / expected).min():.9f}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Normwise relative closeness, ||actual - expected|| <= rtol·||expected|| (and equal shapes)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).norm()
    assert error <= rtol * expected.double().norm(), f"relative error {error / expected.double().norm():.3g}"


def assert_within(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, rtol: float = 1e-5) -> None:
    """|actual - expected| <= rtol·scale elementwise, where ``scale`` is the sum of the absolute values
    of the terms that make up ``expected``: plain ``rtol`` relative error where no terms cancel, the
    fp32 rounding bound where they do (a relative bound alone is unreachable under cancellation)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs()
    excess = error - rtol * scale.double()
    assert (excess <= 0).all(), f"max error {error.max():.3g} at scale {scale.flatten()[excess.argmax()]:.3g}"


def microbatch_grads(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
    return microbatch_grad_sample(module, split_batch(x), list(grad_output.split(1)))


def grads_and_scales(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    """Per-sample gradients from microbatching, and their scales for ``assert_within``.

    Valid for layers whose parameter gradients are bilinear in (input, output gradient) with
    nonnegative coefficients (linear; conv with any padding mode, as padding copies values):
    there the gradient of |x| against |grad_output| is exactly the sum of the absolute terms.
    """
    return microbatch_grads(module, x, grad_output), microbatch_grads(module, x.abs(), grad_output.abs())


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """One random int in [low, high) from ``gen`` (seeded sweeps draw their shapes with it)."""
    return int(torch.randint(low, high, (1,), generator=gen))


def check_rule(module: nn.Module, x: torch.Tensor, rtol: float = 1e-5, bilinear: bool = False) -> None:
    """The rule's grad_sample, norm_sq and clipped_grad for a random output gradient match microbatching.

    Gradients are compared normwise and norms per sample, to ``rtol`` relative; with ``bilinear``
    (see ``grads_and_scales``) every element is compared to ``rtol`` times its sum of absolute
    terms instead, so that random shapes with cancelling terms cannot fail on fp32 rounding.
    """
    grad_output = torch.randn_like(module(x))
    scales = microbatch_grads(module, x.abs(), grad_output.abs()) if bilinear else None
    check_rule_on_samples(module, (x,), split_batch(x), grad_output, rtol=rtol, scales=scales)


def check_rule_on_samples(
    module: nn.Module,
    inputs: tuple,
    sample_inputs: Sequence[tuple],
    grad_output: torch.Tensor,
    reference: Optional[nn.Module] = None,
    rtol: float = 1e-5,
    scales: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """``check_rule`` with each sample's inputs given by the caller (for inputs that ``split_batch``
    cannot split, such as EmbeddingBag offsets), optionally microbatching a ``reference`` module (a
    dense twin of a sparse embedding, whose autograd gradients are sparse), and optionally with
    elementwise ``scales`` (see ``assert_within``)."""
    rule = get_rule(module)
    rule.check(module)
    reference = module if reference is None else reference
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    expected = microbatch_grad_sample(reference, sample_inputs, list(grad_output.split(1)), trainable)
    clip_factors = torch.rand(grad_output.shape[0])

    def assert_matches(actual, reference_value, scale):
        if scale is None:
            assert_rel_close(actual, reference_value, rtol)
        else:
            assert_within(actual, reference_value, scale, rtol)

    grad_sample = rule.grad_sample(module, inputs, grad_output)
    assert grad_sample.keys() == expected.keys()
    for name, grads in expected.items():
        assert_matches(grad_sample[name], grads, None if scales is None else scales[name])

    norms = rule.norm_sq(module, inputs, grad_output)
    assert norms.dtype == torch.float64 and norms.shape == (grad_output.shape[0],)  # upper bounds, fastdp.ops.rounding
    expected_norms = sum(g.flatten(1).double().square().sum(1) for g in expected.values())
    if scales is None:
        norm_scales = expected_norms
    else:
        norm_scales = sum(s.flatten(1).double().square().sum(1) for s in scales.values())
    assert_within(norms, expected_norms, norm_scales, rtol)

    clipped = rule.clipped_grad(module, inputs, grad_output, clip_factors)
    assert clipped.keys() == expected.keys()
    for name, grads in expected.items():
        assert clipped[name].dtype == getattr(module, name).dtype and clipped[name].layout == torch.strided
        weighted_sum = torch.einsum("b,b...->...", clip_factors, grads)
        scale = None if scales is None else torch.einsum("b,b...->...", clip_factors, scales[name])
        assert_matches(clipped[name], weighted_sum, scale)

    # in place into what a gradient buffer holds (another use's sum), as the engine calls it
    start = {name: torch.randn_like(getattr(module, name)) for name in expected}
    out = {name: tensor.clone() for name, tensor in start.items()}
    rule.add_clipped_grad(module, inputs, grad_output, clip_factors, out)
    for name, grads in expected.items():
        weighted_sum = torch.einsum("b,b...->...", clip_factors, grads)
        scale = None if scales is None else torch.einsum("b,b...->...", clip_factors, scales[name]) + start[name].abs()
        assert_matches(out[name] - start[name], weighted_sum, scale)


def check_low_precision_norms(
    module: nn.Module, inputs: tuple, grad_output: torch.Tensor, dtype: torch.dtype, rtol: float
) -> None:
    """Norms from ``dtype`` floating inputs and output grads are float64 bounds within ``rtol`` of the float32 ones."""
    rule = get_rule(module)
    reference = rule.norm_sq(module, inputs, grad_output)
    low_inputs = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs)
    norms = rule.norm_sq(module, low_inputs, grad_output.to(dtype))
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, reference, rtol=rtol, atol=0)


def check_empty_batch(module: nn.Module, x: torch.Tensor) -> None:
    """B = 0: norms of shape [0], zero clipped gradients, [0, *p.shape] per-sample gradients."""
    rule = get_rule(module)
    empty = x[:0]
    grad_output = module(empty).detach()
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert rule.norm_sq(module, (empty,), grad_output).shape == (0,)
    clipped = rule.clipped_grad(module, (empty,), grad_output, torch.ones(0))
    assert {n: g.shape for n, g in clipped.items()} == {n: p.shape for n, p in trainable.items()}
    assert all(not g.any() for g in clipped.values())
    grad_sample = rule.grad_sample(module, (empty,), grad_output)
    assert {n: g.shape for n, g in grad_sample.items()} == {n: (0, *p.shape) for n, p in trainable.items()}


@pytest.fixture(params=["ghost", "direct"])
def norm_method(request, monkeypatch):
    """Force every linear-type weight norm (linear and conv alike) through one method."""
    monkeypatch.setattr(linear_ops, "choose_linear_norm_method", lambda *shape: request.param)
    return request.param

