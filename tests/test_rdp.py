"""RDP of the subsampled Gaussian against independent numerical integration and closed forms."""

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from fastdp.accountants import RDPAccountant
from fastdp.accountants.analysis.rdp import DEFAULT_ALPHAS, compute_rdp, get_privacy_spent


def rdp_by_quadrature(q, sigma, alpha):
    """log(E_{x~N(0,σ²)}[(1 - q + q·N(1,σ²)(x)/N(0,σ²)(x))^α]) / (α - 1) by adaptive quadrature."""

    def integrand(x):
        ratio = math.exp((2 * x - 1) / (2 * sigma**2))
        return stats.norm.pdf(x, scale=sigma) * (1 - q + q * ratio) ** alpha

    lo, hi = -15 * sigma, alpha + 15 * sigma
    points = sorted({0.0, 0.5, 1.0, alpha})
    value, _ = integrate.quad(integrand, lo, hi, points=points, epsabs=0, epsrel=1e-13, limit=500)
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.5])
@pytest.mark.parametrize("q", [0.01, 0.1, 0.5, 0.95])
def test_fractional_and_integer_orders_match_numerical_integration(sigma, q):
    orders = [1.1, 1.5, 2.0, 2.7, 3.0, 4.35, 7.9, 10.9]
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    for alpha, value in zip(orders, ours):
        assert value == pytest.approx(rdp_by_quadrature(q, sigma, alpha), rel=1e-8)


def test_full_batch_is_the_gaussian_mechanism():
    orders = np.array(DEFAULT_ALPHAS)
    assert np.allclose(compute_rdp(q=1.0, noise_multiplier=1.3, steps=7, orders=orders), 7 * orders / (2 * 1.3**2))


def test_tiny_sample_rate_keeps_relative_precision():
    # For q → 0, RDP ≈ q²·α·(e^{1/σ²} - 1)/2 (second-order expansion of log A_α / (α - 1)).
    q, sigma = 1e-6, 1.0
    orders = np.array([1.5, 2.0, 3.0, 5.5])
    expected = q**2 * orders * math.expm1(1 / sigma**2) / 2
    assert np.allclose(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders), expected, rtol=1e-4)


def test_composition_is_additive_and_monotone():
    one = compute_rdp(q=0.02, noise_multiplier=0.9, steps=1, orders=DEFAULT_ALPHAS)
    assert np.allclose(compute_rdp(q=0.02, noise_multiplier=0.9, steps=50, orders=DEFAULT_ALPHAS), 50 * one)
    acc = RDPAccountant()
    eps = []
    for _ in range(3):
        for _ in range(10):
            acc.step(noise_multiplier=0.9, sample_rate=0.02)
        eps.append(acc.get_epsilon(1e-5))
    assert eps[0] < eps[1] < eps[2]


def test_degenerate_noise():
    assert np.all(np.isinf(compute_rdp(q=0.1, noise_multiplier=0.0, steps=1, orders=DEFAULT_ALPHAS)))
    acc = RDPAccountant()
    acc.history = [(0.0, 0.1, 10)]
    assert acc.get_epsilon(1e-5) == math.inf
    acc.history = [(math.inf, 0.1, 10)]
    assert acc.get_epsilon(1e-5) == 0.0


def test_conversion_is_balle_et_al_theorem_21():
    orders, rdp, delta = np.array([2.0, 4.0, 8.0]), np.array([0.5, 1.0, 3.0]), 1e-5
    expected = min(r + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1) for a, r in zip(orders, rdp))
    eps, best = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert eps == pytest.approx(expected, rel=1e-12)
    assert best == 4.0


def test_user_orders_and_edge_warning():
    acc = RDPAccountant()
    acc.history = [(1.0, 0.01, 1000)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default_eps = acc.get_epsilon(1e-5)  # optimum inside the default orders: no warning
    with pytest.warns(RuntimeWarning, match="edge of the orders"):
        narrow_eps = acc.get_epsilon(1e-5, alphas=[1.5, 2.0])
    assert narrow_eps >= default_eps
    eps, alpha = acc.get_privacy_spent(delta=1e-5, alphas=[2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 32.0])
    assert eps >= default_eps and alpha in (8.0, 10.0, 12.0, 16.0)


def test_orders_must_exceed_one():
    with pytest.raises(ValueError, match="orders"):
        compute_rdp(q=0.1, noise_multiplier=1.0, steps=1, orders=[1.0, 2.0])


def test_tiny_sigma_uses_a_valid_convexity_bound_quickly():
    from fastdp.accountants.analysis import rdp as rdp_analysis

    fractional = np.array([a for a in DEFAULT_ALPHAS if a != int(a)])
    for q, sigma in [(0.05, 0.4), (0.5, 1.0), (0.01, 0.2)]:  # where the exact quadrature is affordable
        exact = rdp_analysis._log_a_fractional(q, sigma, fractional)
        bound = rdp_analysis._log_a_convex_bound(q, sigma, fractional)
        assert np.all(bound >= exact * (1 - 1e-12))  # an upper bound: never optimistic
    rdp = compute_rdp(q=0.01, noise_multiplier=0.005, steps=1, orders=DEFAULT_ALPHAS)  # grid would need ~1e9 points
    assert np.all(np.isfinite(rdp)) and np.all(rdp > 0)
