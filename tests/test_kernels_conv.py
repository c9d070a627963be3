"""Triton conv kernels (kernels/conv_norm.py) against the torch reference and microbatching, interpreted on CPU.

Tolerances: the norms are upper bounds (``fastdp.ops.rounding``): at least the float64 reference
and at most 1e-3 above it (the kernels' error model, tf32x3 and truncating tensor-core sums, is
looser than the interpreter's arithmetic). Per-sample gradients: fp32 1e-5 relative; stored in
bf16/fp16 to that dtype's rounding (2e-2 / 4e-3).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

import fastdp.kernels.conv_norm as conv_kernels  # noqa: E402
from fastdp.engine.rules.conv import padded_input  # noqa: E402
from fastdp.ops import conv as conv_ops  # noqa: E402
from fastdp.ops import select_impl  # noqa: E402

from .rule_testing import assert_norm_bounds, grads_and_scales  # noqa: E402

LOW_PRECISION_RTOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close(actual, expected, rtol):
    """Elementwise relative error ≤ rtol, with an absolute floor of rtol × the largest |expected|
    (elements that cancel to near zero carry the rounding error of their large terms)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    floor = rtol * expected.double().abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=floor)


def out_size(size, kernel, stride, dilation):
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def make_case(batch, in_channels, out_channels, spatial, kernel_size, stride, dilation, groups, padding=0, seed=0):
    """Padded input x and output gradient g of matching shapes."""
    torch.manual_seed(seed)
    x = torch.randn(batch, in_channels, *spatial)
    if padding:
        x = F.pad(x, [padding] * 2 * len(spatial))
    out = [out_size(n, k, s, d) for n, k, s, d in zip(x.shape[2:], kernel_size, stride, dilation)]
    return x, torch.randn(batch, out_channels, *out)


# (B, C_in, C_out, spatial, kernel_size, stride, dilation, groups, padding)
CASES = {
    "2d": (2, 3, 5, (7, 6), (3, 2), (1, 1), (1, 1), 1, 0),
    "2d-stride-dilation-groups": (2, 4, 6, (8, 8), (3, 3), (2, 1), (1, 2), 2, 0),
    "2d-padding": (3, 2, 4, (5, 5), (3, 3), (1, 1), (1, 1), 1, 1),
    "2d-depthwise": (2, 4, 8, (6, 7), (3, 3), (1, 2), (1, 1), 4, 1),
    "2d-1x1-output-B1": (1, 8, 8, (3, 3), (3, 3), (1, 1), (1, 1), 1, 0),
    "2d-1x1-kernel": (2, 3, 7, (5, 4), (1, 1), (1, 1), (1, 1), 1, 0),
    "1d": (2, 2, 3, (9,), (3,), (2,), (1,), 1, 1),
    "1d-wide-output": (2, 3, 18, (11,), (2,), (1,), (2,), 1, 0),
    "3d": (2, 2, 4, (4, 5, 4), (2, 3, 2), (1, 2, 1), (1, 1, 2), 2, 0),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles (tl.dot's minimum), so tiny shapes still span several ragged tiles."""
    monkeypatch.setattr(conv_kernels, "MAX_BLOCK_PK", 16)
    monkeypatch.setattr(conv_kernels, "MAX_BLOCK_T", 16)


def reference_norms(x, g, geometry):
    return conv_ops.conv_weight_norm_sq.torch_reference(x.double(), g.double(), *geometry)


@pytest.mark.parametrize("name", CASES)
def test_norms_and_grad_sample_match_reference(name, small_tiles):
    *shape, kernel_size, stride, dilation, groups, padding = CASES[name]
    x, g = make_case(*shape, kernel_size, stride, dilation, groups, padding)
    geometry = (kernel_size, stride, dilation, groups)
    expected = reference_norms(x, g, geometry)
    for norm_sq in (conv_kernels.ghost_norm_sq, conv_kernels.direct_norm_sq, conv_kernels.conv_weight_norm_sq):
        norms = norm_sq(x, g, *geometry)
        assert norms.dtype == torch.float64  # upper bounds (fastdp.ops.rounding)
        assert_norm_bounds(norms, expected, rtol=1e-3)
    grads = conv_kernels.conv_weight_grad_sample(x, g, *geometry)
    assert grads.dtype == x.dtype
    assert_close(grads, conv_ops.conv_weight_grad_sample.torch_reference(x.double(), g.double(), *geometry), 1e-5)


def test_ghost_spans_several_position_tiles(small_tiles):
    """T = 36 > 16: diagonal and (doubled) off-diagonal Gram blocks, ragged last block."""
    x, g = make_case(2, 4, 6, (8, 8), (3, 3), (1, 1), (1, 1), 2)
    geometry = ((3, 3), (1, 1), (1, 1), 2)
    assert_norm_bounds(conv_kernels.ghost_norm_sq(x, g, *geometry), reference_norms(x, g, geometry), rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["2d-stride-dilation-groups", "2d-1x1-output-B1", "1d"])
def test_low_precision(name, dtype, small_tiles):
    *shape, kernel_size, stride, dilation, groups, padding = CASES[name]
    x, g = make_case(*shape, kernel_size, stride, dilation, groups, padding)
    x, g = x.to(dtype), g.to(dtype)
    geometry = (kernel_size, stride, dilation, groups)
    expected = reference_norms(x, g, geometry)  # on the same rounded values, in float64
    for norm_sq in (conv_kernels.ghost_norm_sq, conv_kernels.direct_norm_sq):
        norms = norm_sq(x, g, *geometry)
        assert norms.dtype == torch.float64  # upper bounds (fastdp.ops.rounding)
        assert_norm_bounds(norms, expected, rtol=1e-3)
    grads = conv_kernels.conv_weight_grad_sample(x, g, *geometry)
    assert grads.dtype == dtype
    expected_grads = conv_ops.conv_weight_grad_sample.torch_reference(x.double(), g.double(), *geometry)
    assert_close(grads, expected_grads, LOW_PRECISION_RTOL[dtype])


def test_non_contiguous_inputs():
    x, g = make_case(2, 3, 4, (6, 5), (2, 2), (1, 1), (1, 1), 1)
    x_t, g_t = x.transpose(2, 3).contiguous().transpose(2, 3), g.transpose(2, 3).contiguous().transpose(2, 3)
    geometry = ((2, 2), (1, 1), (1, 1), 1)
    assert_norm_bounds(conv_kernels.direct_norm_sq(x_t, g_t, *geometry), reference_norms(x, g, geometry), rtol=1e-3)
    assert_norm_bounds(conv_kernels.ghost_norm_sq(x_t, g_t, *geometry), reference_norms(x, g, geometry), rtol=1e-3)


def test_module_with_padding_matches_microbatching():
    """End to end: an nn.Conv2d with reflect padding, stride, dilation and groups; per-sample
    gradients from one-sample-at-a-time autograd are the ground truth."""
    torch.manual_seed(3)
    module = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect", bias=False)
    x = torch.randn(3, 4, 7, 6)
    g = torch.randn_like(module(x))
    grads, scales = grads_and_scales(module, x, g)
    geometry = (module.kernel_size, module.stride, module.dilation, module.groups)
    x_padded = padded_input(module, x)
    weight_grads = grads["weight"].double()
    for norm_sq in (conv_kernels.ghost_norm_sq, conv_kernels.direct_norm_sq):
        norms = norm_sq(x_padded, g, *geometry)
        scale = scales["weight"].double().square().sum((1, 2, 3, 4))
        excess = norms.double() - weight_grads.square().sum((1, 2, 3, 4))  # an upper bound: above, by little
        assert (excess >= -1e-6 * scale).all() and (excess <= 1e-4 * scale).all()
    per_sample = conv_kernels.conv_weight_grad_sample(x_padded, g, *geometry)
    assert ((per_sample.double() - weight_grads).abs() <= 1e-5 * scales["weight"].double()).all()


def test_dispatch_and_fallbacks(monkeypatch):
    x, g = make_case(2, 2, 3, (5, 5), (3, 3), (1, 1), (1, 1), 1)
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    assert select_impl("conv_weight_norm_sq", x, g) is conv_kernels.conv_weight_norm_sq
    assert select_impl("conv_weight_grad_sample", x, g) is conv_kernels.conv_weight_grad_sample
    geometry = ((3, 3), (1, 1), (1, 1), 1)
    # float64 runs the torch reference; an empty batch gives empty results
    torch.testing.assert_close(
        conv_kernels.conv_weight_norm_sq(x.double(), g.double(), *geometry), reference_norms(x, g, geometry)
    )
    assert conv_kernels.conv_weight_norm_sq(x[:0], g[:0], *geometry).shape == (0,)
    assert conv_kernels.conv_weight_grad_sample(x[:0], g[:0], *geometry).shape == (0, 3, 2, 3, 3)


def test_bad_input():
    x, g = make_case(2, 4, 6, (5, 5), (3, 3), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        conv_kernels.conv_weight_norm_sq(x, g, (3, 3), (1, 1), (1, 1), 4)
    with pytest.raises(ValueError, match="already padded input"):
        conv_kernels.conv_weight_norm_sq(x, F.pad(g, [1, 1, 1, 1]), (3, 3), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="one int per spatial dim"):
        conv_kernels.conv_weight_grad_sample(x, g, (3, 3), (1,), (1, 1), 1)
