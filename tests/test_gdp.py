"""GDP: the CLT μ, its (ε, δ) curve, and composition of segments."""

import math

import pytest
from scipy.stats import norm

from fastdp.accountants import GaussianAccountant
from fastdp.accountants.analysis.gdp import delta_from_mu, eps_from_mu


def test_mu_poisson_is_bu_et_al():
    acc = GaussianAccountant()
    acc.history = [(1.06, 256 / 60000, 4688)]
    expected = (256 / 60000) * math.sqrt(4688 * (math.exp(1.06**-2) - 1))
    assert acc.get_mu() == pytest.approx(expected, rel=1e-12)


def test_delta_curve_and_inverse():
    for mu in [0.1, 0.5, 1.0, 3.0]:
        for delta in [1e-3, 1e-5, 1e-9]:
            eps = eps_from_mu(mu=mu, delta=delta)
            direct = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
            assert direct == pytest.approx(delta, rel=1e-6) or (eps == 0.0 and direct <= delta)
            assert delta_from_mu(epsilon=eps, mu=mu) == pytest.approx(delta, rel=1e-6) or eps == 0.0


def test_segments_compose_by_mu_squared():
    split, whole = GaussianAccountant(), GaussianAccountant()
    split.history = [(1.2, 0.01, 300), (1.2, 0.01, 700)]
    whole.history = [(1.2, 0.01, 1000)]
    assert split.get_epsilon(1e-6) == pytest.approx(whole.get_epsilon(1e-6), rel=1e-12)
    mixed = GaussianAccountant()
    mixed.history = [(1.0, 0.02, 100), (2.0, 0.05, 100)]
    mu2 = 0.02**2 * 100 * math.expm1(1.0) + 0.05**2 * 100 * math.expm1(0.25)
    assert mixed.get_mu() == pytest.approx(math.sqrt(mu2), rel=1e-12)


def test_large_epsilon_and_tiny_sigma_do_not_overflow():
    acc = GaussianAccountant()
    acc.history = [(0.3, 0.5, 1000)]
    assert math.isfinite(acc.get_epsilon(1e-5)) and acc.get_epsilon(1e-5) > 50
    acc.history = [(0.01, 0.5, 10)]
    assert acc.get_epsilon(1e-5) == math.inf


def test_uniform_subsampling_variant():
    acc = GaussianAccountant()
    acc.history = [(1.5, 0.04, 2249)]
    assert 0 < acc.get_epsilon(1e-5, poisson=False) < math.inf
