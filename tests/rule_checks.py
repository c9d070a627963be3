"""Rule checks beyond ``rule_testing.check_rule``: several inputs split by hand, low-precision norms."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastdp.engine.rules import get_rule
from .microbatch import microbatch_grad_sample
from .rule_testing import assert_rel_close


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """One random int in [low, high) from ``gen`` (seeded sweeps draw their shapes with it)."""
    return int(torch.randint(low, high, (1,), generator=gen))


def check_rule_on_samples(
    module: nn.Module,
    inputs: tuple,
    sample_inputs: Sequence[tuple],
    grad_output: torch.Tensor,
    reference: nn.Module | None = None,
    rtol: float = 1e-5,
) -> None:
    """``rule_testing.check_rule`` for inputs that ``split_batch`` cannot split (EmbeddingBag offsets):
    the caller gives each sample's inputs, and optionally a ``reference`` module to microbatch (a dense
    twin of a sparse embedding, whose autograd gradients are sparse)."""
    rule = get_rule(module)
    rule.check(module)
    reference = module if reference is None else reference
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    expected = microbatch_grad_sample(reference, sample_inputs, list(grad_output.split(1)), trainable)
    clip_factors = torch.rand(grad_output.shape[0])

    grad_sample = rule.grad_sample(module, inputs, grad_output)
    assert grad_sample.keys() == expected.keys()
    for name, grads in expected.items():
        assert_rel_close(grad_sample[name], grads, rtol)

    norms = rule.norm_sq(module, inputs, grad_output)
    assert norms.dtype == torch.float32 and norms.shape == (grad_output.shape[0],)
    expected_norms = sum(g.flatten(1).double().square().sum(1) for g in expected.values())
    torch.testing.assert_close(norms.double(), expected_norms, rtol=rtol, atol=0)

    clipped = rule.clipped_grad(module, inputs, grad_output, clip_factors)
    assert clipped.keys() == expected.keys()
    for name, grads in expected.items():
        assert clipped[name].dtype == getattr(module, name).dtype and clipped[name].layout == torch.strided
        assert_rel_close(clipped[name], torch.einsum("b,b...->...", clip_factors, grads), rtol)


def check_low_precision_norms(
    module: nn.Module, inputs: tuple, grad_output: torch.Tensor, dtype: torch.dtype, rtol: float
) -> None:
    """Norms from ``dtype`` floating inputs and output grads are float32 and within ``rtol`` of the float32 norms."""
    rule = get_rule(module)
    reference = rule.norm_sq(module, inputs, grad_output)
    low_inputs = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs)
    norms = rule.norm_sq(module, low_inputs, grad_output.to(dtype))
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, reference, rtol=rtol, atol=0)
