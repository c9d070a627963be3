"""The fused noise kernel (kernels/noise.py): flat ← (flat + std · N(0, 1)) · scale, in Triton's CPU interpreter.

Statistical checks use fixed seeds, so they are deterministic; their bounds are 5 standard
errors (or a KS p-value of 1e-3), so a correct sampler passes them for almost every seed.
"""

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
from scipy import stats  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastdp.ops as ops  # noqa: E402
import fastdp.ops.noise as noise_ops  # noqa: E402
from fastdp.kernels import noise  # noqa: E402

if not isinstance(noise._add_noise_and_scale_kernel, InterpretedFunction):
    raise RuntimeError("fastdp.kernels was imported before TRITON_INTERPRET=1 was set; the kernels cannot run on CPU")

N = 3 * 4 * noise._QUARTER + 1234  # several programs, the last one ragged


def noisy(flat, std, scale, seed):
    flat = flat.clone()
    noise.add_noise_and_scale(flat, std, scale, torch.Generator().manual_seed(seed))
    return flat


def test_noise_is_standard_normal_times_std():
    std = 2.5
    z = noisy(torch.zeros(N), std, 1.0, seed=0).double() / std
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / N)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # The four normals of one Philox call sit a quarter block apart, the next program's a block
    # apart; all must be uncorrelated, as must neighbours (and the squares: Box–Muller pairs share
    # a radius).
    for lag in (1, noise._QUARTER, 2 * noise._QUARTER, 4 * noise._QUARTER):
        first, second = z[:-lag], z[lag:]
        for u, v in ((first, second), (first**2, second**2)):
            corr = torch.corrcoef(torch.stack([u, v]))[0, 1]
            assert abs(corr) < 5 / math.sqrt(u.numel()), (lag, corr)


def test_each_quarter_of_a_block_is_standard_normal():
    z = noisy(torch.zeros(N), 1.0, 1.0, seed=1).double()
    block = 4 * noise._QUARTER
    quarters = z[: (N // block) * block].view(-1, 4, noise._QUARTER).transpose(0, 1).flatten(1)
    for quarter in quarters:
        assert stats.kstest(quarter.numpy(), "norm").pvalue > 1e-3


def test_same_seed_same_noise_other_seed_other_noise():
    flat = torch.randn(N)
    first, again, other = noisy(flat, 1.0, 1.0, 7), noisy(flat, 1.0, 1.0, 7), noisy(flat, 1.0, 1.0, 8)
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.99


def test_global_rng_is_used_without_generator():
    flat = torch.zeros(N)
    torch.manual_seed(123)
    first = flat.clone()
    noise.add_noise_and_scale(first, 1.0, 1.0, None)
    second = flat.clone()
    noise.add_noise_and_scale(second, 1.0, 1.0, None)
    torch.manual_seed(123)
    again = flat.clone()
    noise.add_noise_and_scale(again, 1.0, 1.0, None)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


def test_zero_std_is_an_exact_scale_and_draws_nothing():
    flat = torch.randn(N)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    out = flat.clone()
    noise.add_noise_and_scale(out, 0.0, 0.37, generator)
    assert torch.equal(out, flat * 0.37)
    assert torch.equal(generator.get_state(), state)
    unchanged = flat.clone()
    noise.add_noise_and_scale(unchanged, 0.0, 1.0, generator)
    assert torch.equal(unchanged, flat)


def test_noise_adds_to_the_input_and_scale_multiplies_the_sum():
    flat = torch.randn(N)
    pure_noise = noisy(torch.zeros(N), 1.5, 1.0, seed=4)
    unscaled = noisy(flat, 1.5, 1.0, seed=4)
    scaled = noisy(flat, 1.5, 0.25, seed=4)
    torch.testing.assert_close(unscaled, flat + pure_noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scaled, 0.25 * unscaled, rtol=1e-6, atol=1e-6)


def test_half_and_strided_buffers():
    for dtype in (torch.bfloat16, torch.float16):
        out = noisy(torch.zeros(N, dtype=dtype), 1.0, 0.5, seed=5)
        assert out.dtype == dtype
        reference = noisy(torch.zeros(N), 1.0, 0.5, seed=5)
        torch.testing.assert_close(out.float(), reference.to(dtype).float())
    buffer = torch.randn(2 * N)
    untouched = buffer[1::2].clone()
    expected = noisy(buffer[::2].contiguous(), 1.0, 2.0, seed=6)
    noise.add_noise_and_scale(buffer[::2], 1.0, 2.0, torch.Generator().manual_seed(6))
    assert torch.equal(buffer[::2], expected)
    assert torch.equal(buffer[1::2], untouched)


def test_triton_backend_dispatches_to_the_kernel(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    flat = torch.randn(N)
    assert ops.select_impl("add_noise_and_scale", flat, 1.0, 1.0, None) is noise.add_noise_and_scale
    out = flat.clone()
    noise_ops.add_noise_and_scale(out, 1.0, 0.5, torch.Generator().manual_seed(9))
    assert torch.equal(out, noisy(flat, 1.0, 0.5, seed=9))
    # the torch path draws different numbers from the same distribution; only the scale must agree
    monkeypatch.setenv("FASTDP_BACKEND", "torch")
    torch_out = flat.clone()
    noise_ops.add_noise_and_scale(torch_out, 0.0, 0.5, None)
    scaled_by_kernel = flat.clone()
    noise.add_noise_and_scale(scaled_by_kernel, 0.0, 0.5, None)
    assert torch.equal(torch_out, scaled_by_kernel)
