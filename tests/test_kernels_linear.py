"""Triton kernels for linear-type layers (kernels/linear_*.py) against the ops' torch references.

Runs in Triton's CPU interpreter, whose 16-wide blocks make these small shapes cross tile
edges in every blocked dimension (T, d, p and the B·T rows). Tolerances:

* norms (fp32 accumulation of exact products, for every input dtype), and fp32 gradients:
  |kernel - expected| ≤ 1e-5 · scale, where scale is the same quantity computed from |a|, |g|
  (the sum of the absolute terms, so cancellation cannot make the bound unreachable);
* bf16/fp16 gradients: the kernel rounds an fp32 sum to the input dtype once, so
  |kernel - exact| ≤ u · |exact| + 2e-5 · scale, with u = eps/2 the dtype's unit roundoff and
  "exact" the float64 result from the same (rounded) inputs.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastdp.ops as ops  # noqa: E402
import fastdp.ops.linear as linear_ops  # noqa: E402
from fastdp.kernels import linear_clipped_grad, linear_direct_norm, linear_ghost_norm, linear_grad_sample  # noqa: E402

if not isinstance(linear_direct_norm._linear_direct_norm_kernel, InterpretedFunction):
    raise RuntimeError("fastdp.kernels was imported before TRITON_INTERPRET=1 was set; the kernels cannot run on CPU")

# (B, T, d, p): ragged tiles everywhere, T = 1, B = 1, d or p below 16, exact multiples of 16.
SHAPES = [(3, 40, 37, 20), (1, 1, 5, 7), (4, 17, 48, 33), (2, 1, 40, 3), (2, 33, 16, 16), (4, 32, 9, 48)]
HALF_SHAPES = [(3, 40, 37, 20), (2, 1, 40, 3)]
CASES = [(shape, torch.float32) for shape in SHAPES] + [
    (shape, dtype) for dtype in (torch.bfloat16, torch.float16) for shape in HALF_SHAPES
]
CASE_IDS = [f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}" for shape, dtype in CASES]


def random_inputs(shape, dtype, seed=0):
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d, generator=gen).to(dtype)
    g = torch.randn(B, T, p, generator=gen).to(dtype)
    c = torch.rand(B, generator=gen) + 0.05
    return a, g, c


def assert_within(actual, expected, scale, rtol=1e-5):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs()
    excess = error - rtol * scale.double()
    assert (excess <= 0).all(), f"max error {error.max():.3g}, scale at worst {scale.flatten()[excess.argmax()]:.3g}"


def assert_rounded_within(actual, exact, scale):
    """A result rounded once to its dtype from an fp32 sum (see the module docstring)."""
    assert actual.shape == exact.shape, (actual.shape, exact.shape)
    unit_roundoff = torch.finfo(actual.dtype).eps / 2 if actual.dtype != torch.float32 else 0.0
    error = (actual.double() - exact.double()).abs()
    bound = unit_roundoff * exact.double().abs() + 2e-5 * scale.double()
    assert (error <= bound).all(), f"max error {error.max():.3g}, max bound excess {(error - bound).max():.3g}"


@pytest.mark.parametrize("shape, dtype", CASES, ids=CASE_IDS)
def test_weight_norms_match_reference(shape, dtype):
    a, g, _ = random_inputs(shape, dtype)
    scale = linear_ops.linear_norm_sq_direct.torch_reference(a.abs(), g.abs())
    for kernel, op in ((linear_direct_norm.linear_norm_sq_direct, linear_ops.linear_norm_sq_direct),
                       (linear_ghost_norm.linear_norm_sq_ghost, linear_ops.linear_norm_sq_ghost)):
        expected = op.torch_reference(a, g)
        norms = kernel(a, g)
        assert norms.dtype == expected.dtype == torch.float64
        assert_within(norms, expected, scale)


@pytest.mark.parametrize("shape, dtype", CASES, ids=CASE_IDS)
def test_bias_norm_matches_reference(shape, dtype):
    _, g, _ = random_inputs(shape, dtype)
    expected = linear_ops.linear_bias_norm_sq.torch_reference(g)
    norms = linear_direct_norm.linear_bias_norm_sq(g)
    assert norms.dtype == expected.dtype == torch.float64
    assert_within(norms, expected, linear_ops.linear_bias_norm_sq.torch_reference(g.abs()))


@pytest.mark.parametrize("shape, dtype", CASES, ids=CASE_IDS)
def test_grad_sample_matches_reference(shape, dtype):
    a, g, _ = random_inputs(shape, dtype)
    expected = linear_ops.linear_grad_sample.torch_reference(a, g)
    out = linear_grad_sample.linear_grad_sample(a, g)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    exact = torch.bmm(g.double().mT, a.double())
    assert_rounded_within(out, exact, torch.bmm(g.double().abs().mT, a.double().abs()))


@pytest.mark.parametrize("shape, dtype", CASES, ids=CASE_IDS)
def test_clipped_grads_match_reference(shape, dtype):
    a, g, c = random_inputs(shape, dtype)
    scaled_g = (g * c.to(dtype)[:, None, None]).double()  # the reference rounds c ⊙ g to the input dtype

    expected = linear_ops.linear_clipped_grad.torch_reference(a, g, c)
    out = linear_clipped_grad.linear_clipped_grad(a, g, c)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    exact = scaled_g.flatten(0, 1).T @ a.double().flatten(0, 1)
    assert_rounded_within(out, exact, scaled_g.abs().flatten(0, 1).T @ a.double().abs().flatten(0, 1))

    expected_bias = linear_ops.linear_bias_clipped_grad.torch_reference(g, c)
    out_bias = linear_clipped_grad.linear_bias_clipped_grad(g, c)
    assert out_bias.dtype == expected_bias.dtype and out_bias.shape == expected_bias.shape
    c_rounded = c.to(dtype).double()
    exact_bias = c_rounded @ g.double().sum(1)
    assert_rounded_within(out_bias, exact_bias, c_rounded @ g.double().abs().sum(1))


def test_clipped_grad_of_unit_factors_is_the_weight_gradient():
    """With c = 1 the clipped sum is the ordinary weight gradient, which autograd gives independently."""
    a, g, _ = random_inputs((3, 21, 19, 18), torch.float32, seed=3)
    layer = torch.nn.Linear(19, 18)
    layer(a).backward(g)
    out = linear_clipped_grad.linear_clipped_grad(a, g, torch.ones(3))
    assert_within(out, layer.weight.grad, g.abs().flatten(0, 1).T @ a.abs().flatten(0, 1))
    assert_within(linear_clipped_grad.linear_bias_clipped_grad(g, torch.ones(3)), layer.bias.grad, g.abs().sum((0, 1)))


def test_strided_inputs():
    """Views with a non-unit last stride (a transposed buffer) are read through their strides."""
    B, T, d, p = 2, 19, 23, 17
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(B, d, T, generator=gen).transpose(1, 2)
    g = torch.randn(B, p, T, generator=gen).transpose(1, 2)
    c = torch.rand(B, generator=gen)
    assert not a.is_contiguous() and not g.is_contiguous()
    norm_scale = linear_ops.linear_norm_sq_direct.torch_reference(a.abs(), g.abs())
    for kernel, op in ((linear_direct_norm.linear_norm_sq_direct, linear_ops.linear_norm_sq_direct),
                       (linear_ghost_norm.linear_norm_sq_ghost, linear_ops.linear_norm_sq_ghost)):
        assert_within(kernel(a, g), op.torch_reference(a, g), norm_scale)
    grad_scale = torch.bmm(g.abs().mT, a.abs())
    assert_within(linear_grad_sample.linear_grad_sample(a, g), linear_ops.linear_grad_sample.torch_reference(a, g),
                  grad_scale)
    assert_within(linear_clipped_grad.linear_clipped_grad(a, g, c),
                  linear_ops.linear_clipped_grad.torch_reference(a, g, c), (c[:, None, None] * grad_scale).sum(0))
    assert_within(linear_direct_norm.linear_bias_norm_sq(g), linear_ops.linear_bias_norm_sq.torch_reference(g),
                  linear_ops.linear_bias_norm_sq.torch_reference(g.abs()))


def test_inputs_the_kernels_do_not_cover_run_the_reference():
    """float64 and empty batches (Poisson sampling can draw none) give exactly the reference's result."""
    a, g, c = random_inputs((2, 5, 6, 7), torch.float64)
    assert torch.equal(linear_direct_norm.linear_norm_sq_direct(a, g),
                       linear_ops.linear_norm_sq_direct.torch_reference(a, g))
    assert torch.equal(linear_clipped_grad.linear_clipped_grad(a, g, c),
                       linear_ops.linear_clipped_grad.torch_reference(a, g, c))
    empty_a, empty_g = torch.zeros(0, 5, 6), torch.zeros(0, 5, 7)
    assert linear_ghost_norm.linear_norm_sq_ghost(empty_a, empty_g).shape == (0,)
    assert torch.equal(linear_clipped_grad.linear_clipped_grad(empty_a, empty_g, torch.zeros(0)), torch.zeros(7, 6))
    assert torch.equal(linear_clipped_grad.linear_bias_clipped_grad(empty_g, torch.zeros(0)), torch.zeros(7))


def test_bad_shapes_raise():
    a, g, c = random_inputs((2, 5, 6, 7), torch.float32)
    with pytest.raises(ValueError, match="a and g"):
        linear_direct_norm.linear_norm_sq_direct(a, g[:1])
    with pytest.raises(ValueError, match="a and g"):
        linear_ghost_norm.linear_norm_sq_ghost(a[0], g[0])
    with pytest.raises(ValueError, match="c must be"):
        linear_clipped_grad.linear_clipped_grad(a, g, c[:1])
    with pytest.raises(ValueError, match="c must be"):
        linear_clipped_grad.linear_bias_clipped_grad(g, c[:, None])
    with pytest.raises(ValueError, match="g must be"):
        linear_direct_norm.linear_bias_norm_sq(g[0])


KERNELS = {
    "linear_norm_sq_direct": linear_direct_norm.linear_norm_sq_direct,
    "linear_norm_sq_ghost": linear_ghost_norm.linear_norm_sq_ghost,
    "linear_bias_norm_sq": linear_direct_norm.linear_bias_norm_sq,
    "linear_clipped_grad": linear_clipped_grad.linear_clipped_grad,
    "linear_bias_clipped_grad": linear_clipped_grad.linear_bias_clipped_grad,
    "linear_grad_sample": linear_grad_sample.linear_grad_sample,
}


def test_triton_backend_dispatches_to_these_kernels(monkeypatch):
    a, g, c = random_inputs((2, 18, 17, 19), torch.float32)
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    for name, kernel in KERNELS.items():
        assert ops.select_impl(name, a, g) is kernel, name
    norms = linear_ops.linear_norm_sq_direct(a, g)
    clipped = linear_ops.linear_clipped_grad(a, g, c)
    monkeypatch.setenv("FASTDP_BACKEND", "torch")
    assert ops.select_impl("linear_norm_sq_direct", a, g) is linear_ops.linear_norm_sq_direct.torch_reference
    scale = torch.bmm(g.abs().mT, a.abs())
    assert_within(norms, linear_ops.linear_norm_sq_direct(a, g), (scale**2).sum((1, 2)))
    assert_within(clipped, linear_ops.linear_clipped_grad(a, g, c), (c[:, None, None] * scale).sum(0))
