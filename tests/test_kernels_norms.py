"""Triton norm-layer kernel (kernels/norm_layers.py) against the torch reference and microbatching, on CPU.

Tolerances: fp32 inputs 1e-5 relative. bf16/fp16 inputs are exact in fp32 and x̂ is
recomputed in fp32 as the reference does, so they are held to 1e-4 against the reference
on the same rounded values.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import fastdp.kernels.norm_layers as norm_kernels  # noqa: E402
from fastdp.ops import norms as norm_ops  # noqa: E402
from fastdp.ops import select_impl  # noqa: E402

from .microbatch import microbatch_grad_sample, split_batch  # noqa: E402


def assert_close(actual, expected, rtol):
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    floor = rtol * expected.double().abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=floor)


def make_case(shape, seed, dtype=torch.float32, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 2 + offset).to(dtype)
    return x, torch.randn(shape, generator=generator).to(dtype)


def reference(x, grad, num_groups, eps, rms):
    return norm_ops.norm_weight_grad_sample.torch_reference(x.double(), grad.double(), num_groups, eps, rms)


# ([B, M, C, S], num_groups, rms): LayerNorm / RMSNorm [B, M, C, 1]; GroupNorm / InstanceNorm [B, 1, C, S]
CASES = {
    "layer-norm": ((3, 5, 7, 1), 1, False),
    "layer-norm-B1-M1": ((1, 1, 8, 1), 1, False),
    "layer-norm-many-rows": ((2, 40, 6, 1), 1, False),
    "rms-norm": ((2, 6, 5, 1), 1, True),
    "group-norm": ((2, 1, 8, 9), 4, False),
    "group-norm-one-group": ((3, 1, 6, 10), 1, False),
    "instance-norm": ((2, 1, 6, 7), 6, False),
    "instance-norm-1x1": ((3, 1, 4, 1), 4, False),  # one element per group: x̂ = 0
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    shape, num_groups, rms = CASES[name]
    x, grad = make_case(shape, seed=len(name), offset=3.0)  # a mean offset exercises the variance merge
    result = norm_kernels.norm_weight_grad_sample(x, grad, num_groups, 1e-5, rms)
    assert_close(result, reference(x, grad, num_groups, 1e-5, rms), 1e-5)


@pytest.mark.parametrize("name", ["layer-norm-many-rows", "group-norm", "instance-norm"])
def test_small_tiles_and_row_slices(name, monkeypatch):
    """Several statistics tiles, channel tiles and row slices, all with ragged edges."""
    monkeypatch.setattr(norm_kernels, "BLOCK_STATS", 4)
    monkeypatch.setattr(norm_kernels, "BLOCK_ROWS", 4)
    monkeypatch.setattr(norm_kernels, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(norm_kernels, "TARGET_PROGRAMS", 32)
    shape, num_groups, rms = CASES[name]
    x, grad = make_case(shape, seed=1, offset=100.0)  # large mean: per-tile variances must merge exactly
    result = norm_kernels.norm_weight_grad_sample(x, grad, num_groups, 1e-5, rms)
    assert_close(result, reference(x, grad, num_groups, 1e-5, rms), 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["layer-norm", "rms-norm", "group-norm"])
def test_low_precision(name, dtype):
    shape, num_groups, rms = CASES[name]
    x, grad = make_case(shape, seed=2, dtype=dtype, offset=1.0)
    result = norm_kernels.norm_weight_grad_sample(x, grad, num_groups, 1e-5, rms)
    assert_close(result, reference(x, grad, num_groups, 1e-5, rms), 1e-4)


def test_non_contiguous_view():
    x, grad = make_case((2, 1, 6, 8), seed=4)
    x_t, grad_t = x.mT.contiguous().mT, grad.mT.contiguous().mT
    result = norm_kernels.norm_weight_grad_sample(x_t, grad_t, 3, 1e-5, False)
    assert_close(result, reference(x, grad, 3, 1e-5, False), 1e-5)


@pytest.mark.parametrize(
    "module, input_shape, view",
    [
        (nn.LayerNorm(6), (3, 4, 6), lambda x: (x.shape[0], x.shape[1], 6, 1)),
        (nn.RMSNorm(5, eps=1e-6), (2, 3, 5), lambda x: (x.shape[0], x.shape[1], 5, 1)),
        (nn.GroupNorm(2, 4), (3, 4, 3, 3), lambda x: (x.shape[0], 1, 4, 9)),
        (nn.InstanceNorm1d(3, affine=True), (2, 3, 7), lambda x: (x.shape[0], 1, 3, 7)),
    ],
    ids=["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d"],
)
def test_modules_match_microbatching(module, input_shape, view):
    """End to end: per-sample weight gradients from one-sample-at-a-time autograd."""
    torch.manual_seed(5)
    x = torch.randn(input_shape)
    grad_output = torch.randn_like(module(x))
    expected = microbatch_grad_sample(module, split_batch(x), list(grad_output.split(1)))["weight"]
    num_groups = {nn.GroupNorm: 2, nn.InstanceNorm1d: 3}.get(type(module), 1)
    eps = module.eps
    result = norm_kernels.norm_weight_grad_sample(
        x.reshape(view(x)), grad_output.reshape(view(x)), num_groups, eps, isinstance(module, nn.RMSNorm)
    )
    assert_close(result, expected.reshape(result.shape), 1e-5)


def test_dispatch_fallbacks_and_bad_input(monkeypatch):
    x, grad = make_case((2, 3, 4, 1), seed=6)
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    assert select_impl("norm_weight_grad_sample", x, grad) is norm_kernels.norm_weight_grad_sample
    as_float64 = norm_kernels.norm_weight_grad_sample(x.double(), grad.double(), 1, 1e-5, False)
    torch.testing.assert_close(as_float64, reference(x, grad, 1, 1e-5, False))  # the torch reference runs
    assert torch.equal(norm_kernels.norm_weight_grad_sample(x[:0], grad[:0], 1, 1e-5, False), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="num_groups=3 must divide"):
        norm_kernels.norm_weight_grad_sample(x, grad, 3, 1e-5, False)
    with pytest.raises(ValueError, match=r"\[B, M, C, S\]"):
        norm_kernels.norm_weight_grad_sample(x, grad[..., 0], 1, 1e-5, False)
