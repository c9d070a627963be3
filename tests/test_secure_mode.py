"""secure_mode: sampling and noise come from the OS CSPRNG, with the right distributions.

These draws cannot be seeded (that is the point), so the statistical tests use bounds that a
correct generator fails with probability below about 1e-6.
"""

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp import PrivacyEngine
from fastdp.data.samplers import UniformWithReplacementSampler
from fastdp.optimizers import DPOptimizer
from fastdp.utils.secure_random import SecureRandom


def test_uniforms_are_uniform_on_unit_interval():
    u = SecureRandom().rand(200_000)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-6


def test_gaussians_are_standard_normal():
    z = SecureRandom().randn(200_000)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-6
    assert abs(float(z.std()) - 1) < 0.02


def test_draws_do_not_depend_on_torch_seed():
    torch.manual_seed(0)
    a = SecureRandom().randn(8)
    torch.manual_seed(0)
    b = SecureRandom().randn(8)
    assert not torch.equal(a, b)


def test_poisson_sampler_with_secure_generator_has_binomial_sizes():
    sampler = UniformWithReplacementSampler(num_samples=1000, sample_rate=0.1, generator=SecureRandom(), steps=200)
    sizes = torch.tensor([len(batch) for batch in sampler], dtype=torch.float64)
    # mean of 200 Binomial(1000, 0.1): std of the mean is sqrt(90 / 200) ≈ 0.67
    assert abs(float(sizes.mean()) - 100) < 5 * 0.67


def _private_sgd(sigma, secure=True, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)
    data = TensorDataset(torch.zeros(64, 4), torch.zeros(64, 1))
    engine = PrivacyEngine(accountant="rdp", secure_mode=secure)
    return engine, engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=sigma, max_grad_norm=2.0, **kw,
    )


def test_secure_engine_noise_std_is_sigma_c_over_expected_batch():
    engine, (model, optimizer, loader) = _private_sgd(sigma=1.5)
    updates = []
    for _ in range(3):
        for x, y in loader:
            before = model.weight.detach().clone()
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()  # zero gradient: the update is the noise
            optimizer.step()
            updates.append((before - model.weight.detach()).flatten())
    noise = torch.cat(updates).double()
    expected = 1.5 * 2.0 / 16
    # 48 samples of the std: relative error of the sample std ≈ 1/sqrt(2·48) ≈ 0.1
    assert abs(float(noise.std()) / expected - 1) < 0.5
    assert engine.get_epsilon(1e-5) > 0
    assert isinstance(optimizer.generator, SecureRandom) and isinstance(loader.batch_sampler.generator, SecureRandom)


def test_secure_noise_fits_the_gaussian_on_many_draws():
    model = nn.Linear(1000, 100, bias=False)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=1, loss_reduction="sum", secure_mode=True)
    model.weight.grad = torch.zeros_like(model.weight)
    optimizer.add_noise()
    assert stats.kstest(model.weight.grad.flatten().double().numpy(), "norm").pvalue > 1e-6


def test_secure_mode_refuses_a_seeded_generator():
    with pytest.raises(ValueError, match="noise_generator is not allowed with secure_mode"):
        _private_sgd(sigma=1.0, noise_generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="secure_mode=True draws noise from the OS CSPRNG"):
        DPOptimizer(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                    expected_batch_size=4, secure_mode=True, generator=torch.Generator())
