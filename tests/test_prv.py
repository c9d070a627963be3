"""PRVAccountant: error bars that bracket independently computed truths.

References: the published Opacus value (tests/data/accountants.json), the closed
form of the Gaussian mechanism (Balle & Wang 2018), scipy quadrature for one
step, and numbers cross-checked once against Opacus 1.6 (quoted with their
source, never imported).
"""

import itertools
import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from fastdp.accountants.prv import PRVAccountant

from .reference import load_reference


def gaussian_delta(epsilon, mu):
    """Analytic Gaussian mechanism (Balle & Wang 2018): Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ)."""
    return stats.norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon + stats.norm.logcdf(-mu / 2 - epsilon / mu))


def gaussian_epsilon(delta, mu):
    return optimize.brentq(lambda e: gaussian_delta(e, mu) - delta, 0, mu * mu / 2 + 40 * mu + 40, xtol=1e-12)


def single_step_epsilon(sigma, q, delta):
    """ε(δ) of one step (worse direction), from δ(ε) = ∫ (p - e^ε q)_+ dx by quadrature."""
    m = 1 / sigma
    mixture = lambda x: (1 - q) * stats.norm.pdf(x) + q * stats.norm.pdf(x - m)
    loss = lambda x: np.logaddexp(math.log1p(-q), math.log(q) + m * x - m * m / 2)

    def delta_of(epsilon):
        x_remove = optimize.brentq(lambda x: loss(x) - epsilon, -80, 400, xtol=1e-14)
        remove = integrate.quad(lambda x: mixture(x) - math.exp(epsilon) * stats.norm.pdf(x), x_remove, np.inf, epsabs=1e-16)[0]
        add = 0.0
        if -epsilon > math.log1p(-q):  # the add loss -L reaches ε
            x_add = optimize.brentq(lambda x: loss(x) + epsilon, -80, 400, xtol=1e-14)
            add = integrate.quad(lambda x: stats.norm.pdf(x) - math.exp(epsilon) * mixture(x), -np.inf, x_add, epsabs=1e-16)[0]
        return max(remove, add)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0, 20, xtol=1e-12)


def prv(history):
    acc = PRVAccountant()
    acc.history = list(history)
    return acc


def test_reproduces_the_published_opacus_value():
    (entry,) = [e for e in load_reference()["epsilon"] if e["accountant"] == "prv"]
    eps = prv([(entry["sigma"], entry["q"], entry["steps"])]).get_epsilon(entry["delta"])
    assert eps == pytest.approx(entry["epsilon"], abs=entry["abs_tol"])


# Opacus 1.6 PRVAccountant.get_epsilon (eps_error 0.01, upper bound): a different grid, so equal
# within about eps_error.
OPACUS_EPSILONS = [
    ([(1.0, 0.004, 12500)], 1e-5, 2.472202224234375),
    ([(0.6, 0.1, 100)], 1e-8, 28.44283812557846),
    ([(1.0, 0.01, 500), (2.0, 0.05, 300), (0.8, 0.002, 2000)], 1e-6, 2.8131731895354597),
    ([(0.3, 0.01, 1000)], 1e-5, 69.82952301046925),
    ([(1.0, 0.01, 100000)], 1e-5, 25.584087949545165),
]


@pytest.mark.parametrize("history, delta, expected", OPACUS_EPSILONS)
def test_matches_opacus(history, delta, expected):
    assert prv(history).get_epsilon(delta) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 1, 1e-5), (0.5, 10, 1e-8), (2.0, 1000, 1e-5), (0.8, 1000, 1e-5)])
def test_bounds_bracket_the_analytic_gaussian(sigma, steps, delta):
    # (0.8, 1000): Opacus 1.6 returns inf for this history
    lower, estimate, upper = prv([(sigma, 1.0, steps)]).compute_epsilon(delta)
    exact = gaussian_epsilon(delta, math.sqrt(steps) / sigma)
    assert lower <= exact <= upper
    assert abs(estimate - exact) < 0.01


@pytest.mark.parametrize("sigma, q, delta", [(1.0, 0.1, 1e-5), (0.5, 0.3, 1e-6), (2.0, 0.5, 1e-3)])
def test_bounds_bracket_one_step_by_quadrature(sigma, q, delta):
    lower, _, upper = prv([(sigma, q, 1)]).compute_epsilon(delta)
    assert lower <= single_step_epsilon(sigma, q, delta) <= upper


@pytest.mark.parametrize("eps_error", [0.1, 0.01, 0.002])
def test_error_bars_have_the_requested_width(eps_error):
    acc = prv([(1.1, 0.01, 3000), (0.9, 0.02, 1000)])
    lower, estimate, upper = acc.compute_epsilon(1e-6, eps_error=eps_error)
    assert lower <= estimate <= upper
    assert upper - lower <= 2 * eps_error + 1e-3  # ± eps_error, plus ε(δ - δ_err) - ε(δ + δ_err)
    assert acc.get_epsilon(1e-6, eps_error=eps_error) == upper


def test_tighter_error_gives_nested_bounds():
    acc = prv([(1.0, 0.02, 5000)])
    loose, tight = acc.compute_epsilon(1e-5, eps_error=0.05), acc.compute_epsilon(1e-5, eps_error=0.005)
    assert loose[0] <= tight[0] <= tight[2] <= loose[2]


def test_heterogeneous_history_does_not_depend_on_order_or_splitting():
    segments = [(1.0, 0.01, 300), (0.7, 0.05, 40), (2.0, 0.2, 100), (1.3, 1.0, 5)]
    expected = prv(segments).compute_epsilon(1e-6)
    for order in itertools.permutations(segments):
        assert prv(order).compute_epsilon(1e-6) == pytest.approx(expected, rel=1e-9)
    split = [(1.0, 0.01, 100), (0.7, 0.05, 40), (1.0, 0.01, 200), (2.0, 0.2, 100), (1.3, 1.0, 2), (1.3, 1.0, 3)]
    assert prv(split).compute_epsilon(1e-6) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "history",
    [
        [(0.3, 0.01, 1000)],  # ε ≈ 70
        [(0.4, 0.05, 5000)],  # ε ≈ 366
        [(0.3, 1.0, 1)],
        [(0.3, 1.0, 10**6)],  # ε ≈ 5.6e6: the mesh is coarsened, the bounds widen but stay valid
        [(1.0, 1e-5, 10**6)],
        [(0.5, 0.1, 10**6)],  # Opacus 1.6 tries to allocate 336 GiB here
        [(1.0, 0.01, 10**6)],
    ],
)
def test_extreme_inputs_give_finite_bounds(history):
    lower, estimate, upper = prv(history).compute_epsilon(1e-5)
    assert 0 <= lower <= estimate <= upper < math.inf
    sigma, q, steps = history[0]
    if q == 1.0:
        assert lower <= gaussian_epsilon(1e-5, math.sqrt(steps) / sigma) <= upper


def test_degenerate_histories():
    assert prv([]).get_epsilon(1e-5) == 0.0
    assert prv([]).compute_epsilon(1e-5) == (0.0, 0.0, 0.0)
    assert prv([(math.inf, 0.5, 100), (1.0, 0.1, 0)]).get_epsilon(1e-5) == 0.0
    assert prv([(0.0, 0.1, 1), (1.0, 0.1, 10)]).get_epsilon(1e-5) == math.inf
    acc = PRVAccountant()
    assert acc.mechanism() == "prv"
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert 0 < acc.get_epsilon(1e-5) < math.inf


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        prv([(1.0, 0.01, 10)]).get_epsilon(delta)


@pytest.mark.parametrize("eps_error", [0.0, -0.01, math.nan, math.inf, "0.01"])
def test_bad_eps_error(eps_error):
    with pytest.raises(ValueError, match="eps_error"):
        prv([(1.0, 0.01, 10)]).get_epsilon(1e-5, eps_error=eps_error)


@pytest.mark.parametrize("delta_error", [0.0, -1e-8, math.nan, 1e-5, 1e-3])
def test_bad_delta_error(delta_error):
    with pytest.raises(ValueError, match="delta_error"):
        prv([(1.0, 0.01, 10)]).compute_epsilon(1e-5, delta_error=delta_error)
