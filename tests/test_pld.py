"""PLDAccountant and the shared privacy-loss numerics, against independent computations.

Independent references used here: scipy quadrature of the Gaussian mixture
densities, the closed form of the Gaussian mechanism (Balle & Wang 2018), the
RDP accountant (a valid but looser bound), and numbers cross-checked once
against Google's dp_accounting 0.6 (quoted with their source, never imported).
"""

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from fastdp.accountants.analysis import privacy_loss as pl
from fastdp.accountants.pld import PLDAccountant
from fastdp.accountants.rdp import RDPAccountant


# ---------------------------------------------------------------- independent references


def remove_loss(x, sigma, q):
    """log(dM/dμ0)(x), written out directly (no fastdp code)."""
    return np.log(1 - q + q * np.exp(x / sigma - 1 / (2 * sigma**2)))


def mixture_pdf(x, sigma, q):
    return (1 - q) * stats.norm.pdf(x) + q * stats.norm.pdf(x - 1 / sigma)


def loss_threshold(t, sigma, q):
    return optimize.brentq(lambda x: remove_loss(x, sigma, q) - t, -80, 80, xtol=1e-14, rtol=1e-15)


def single_step_delta(sigma, q, epsilon):
    """δ(ε) of one step, max over both directions: ∫ (p - e^ε q)_+ dx by quadrature."""
    remove = lambda x: mixture_pdf(x, sigma, q) - math.exp(epsilon) * stats.norm.pdf(x)  # (P, Q) = (M, μ0)
    add = lambda x: stats.norm.pdf(x) - math.exp(epsilon) * mixture_pdf(x, sigma, q)  # (P, Q) = (μ0, M)
    deltas = []
    for integrand, sign in ((remove, 1), (add, -1)):
        try:  # the loss exceeds ε on a half-line of x
            x_star = loss_threshold(sign * epsilon, sigma, q)
        except ValueError:  # never
            deltas.append(0.0)
            continue
        bounds = (x_star, np.inf) if sign == 1 else (-np.inf, x_star)
        deltas.append(integrate.quad(integrand, *bounds, epsabs=1e-16, epsrel=1e-12, limit=200)[0])
    return max(deltas)


def gaussian_delta(epsilon, mu):
    """Analytic Gaussian mechanism (Balle & Wang 2018): Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ)."""
    return stats.norm.cdf(mu / 2 - epsilon / mu) - math.exp(epsilon + stats.norm.logcdf(-mu / 2 - epsilon / mu))


def gaussian_epsilon(delta, mu):
    return optimize.brentq(lambda e: gaussian_delta(e, mu) - delta, 0, mu * mu / 2 + 40 * mu + 40, xtol=1e-12)


def pld(history, interval=1e-4):
    acc = PLDAccountant(value_discretization_interval=interval)
    acc.history = list(history)
    return acc


# ---------------------------------------------------------------- one step


@pytest.mark.parametrize("sigma, q", [(1.0, 0.01), (0.5, 0.3), (2.0, 1e-4), (0.8, 1.0)])
@pytest.mark.parametrize("direction", pl.DIRECTIONS)
def test_loss_cdf_and_sf_match_quadrature(sigma, q, direction):
    for t in (-0.5, -1e-3, 0.0, 0.02, 0.3, 2.0):
        x_star = None
        try:
            x_star = loss_threshold(t if direction == pl.REMOVE else -t, sigma, q)
        except ValueError:
            pass
        if direction == pl.REMOVE:  # P[L(X) ≤ t], X ~ M
            cdf = 0.0 if x_star is None else integrate.quad(mixture_pdf, -np.inf, x_star, args=(sigma, q), epsabs=1e-15)[0]
        else:  # P[-L(X) ≤ t] = P[X ≥ x(-t)], X ~ μ0
            cdf = 1.0 if x_star is None else stats.norm.sf(x_star)
        assert pl.loss_cdf(t, sigma, q, direction) == pytest.approx(cdf, rel=1e-9, abs=1e-15)
        assert pl.loss_sf(t, sigma, q, direction) == pytest.approx(1 - cdf, rel=1e-9, abs=1e-15)


def test_survival_function_keeps_relative_precision_far_in_the_tail():
    sigma, q = 0.5, 0.01
    for t in (10.0, 30.0, 60.0):
        x_star = loss_threshold(t, sigma, q)
        expected = (1 - q) * stats.norm.sf(x_star) + q * stats.norm.sf(x_star - 1 / sigma)
        assert pl.loss_sf(t, sigma, q, pl.REMOVE) == pytest.approx(expected, rel=1e-9)
    assert expected < 1e-100  # where 1 - CDF would have returned 0


@pytest.mark.parametrize("sigma, q, interval", [(1.0, 0.01, 1e-4), (0.5, 0.3, 1e-3), (2.0, 0.001, 1e-5), (1.0, 1.0, 1e-3)])
def test_connect_the_dots_keeps_mass_and_the_exp_moment(sigma, q, interval):
    for direction, step in pl.discretize_step(sigma, q, interval, 1e-20).items():
        values = (step.start + np.arange(len(step.pmf))) * interval
        assert step.mass + step.infinity_mass == pytest.approx(1.0, abs=1e-14)
        assert np.all(step.pmf >= 0)
        # E_P[e^(-Y)] = Q(support): the split keeps it, truncation moves only ~1e-20
        assert np.dot(step.pmf, np.exp(-values)) == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize("sigma, q", [(1.0, 0.1), (0.5, 0.3), (2.0, 0.02), (0.7, 1.0)])
def test_single_step_is_exact_on_the_lattice_and_pessimistic_between(sigma, q):
    acc = pld([(sigma, q, 1)])
    for epsilon in (0.01, 0.1, 0.5, 1.2):  # lattice points: the chord meets the true curve
        assert acc.get_delta(epsilon) == pytest.approx(single_step_delta(sigma, q, epsilon), rel=1e-9, abs=1e-14)
    for epsilon in (0.01005, 0.23333, 0.77777):  # between lattice points: above, but barely
        exact = single_step_delta(sigma, q, epsilon)
        assert exact - 1e-14 <= acc.get_delta(epsilon) <= exact * (1 + 1e-4) + 1e-14


@pytest.mark.parametrize("sigma, q", [(0.5, 0.01), (1.0, 0.1), (2.0, 0.5), (0.8, 0.9), (0.3, 0.001)])
def test_rdp_also_bounds_the_reversed_pair(sigma, q):
    """The FFT windows rely on D_α(μ0‖M) ≤ D_α(M‖μ0) (Mironov, Talwar, Zhang 2019): check by quadrature."""
    rdp = pl.history_rdp([(sigma, q, 1)])
    for order in (2, 4, 8, 16, 32):
        integrand = lambda x: stats.norm.pdf(x) * np.exp(-(order - 1) * remove_loss(x, sigma, q))
        reversed_rdp = math.log(integrate.quad(integrand, -40, 40 + 40 / sigma, limit=500, epsrel=1e-12)[0]) / (order - 1)
        assert reversed_rdp <= rdp[list(pl.WINDOW_ORDERS).index(order)] * (1 + 1e-9)


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize(
    "sigma, steps, delta", [(1.0, 1, 1e-5), (0.5, 10, 1e-8), (2.0, 1000, 1e-5), (5.0, 3000, 1e-10), (0.3, 10**6, 1e-6)]
)
def test_sample_rate_one_matches_the_analytic_gaussian_and_is_pessimistic(sigma, steps, delta):
    exact = gaussian_epsilon(delta, math.sqrt(steps) / sigma)
    eps = pld([(sigma, 1.0, steps)]).get_epsilon(delta)
    assert exact - 1e-9 <= eps <= exact + 1e-3 * max(1.0, exact / 1000)
    assert pld([(sigma, 1.0, steps)]).get_delta(exact) >= delta * (1 - 1e-9)


@pytest.mark.parametrize("sigma, steps, interval", [(1.0, 10000, 1e-3), (5.0, 3000, 1e-4), (20.0, 100000, 1e-4)])
def test_fft_composition_of_many_steps_matches_the_analytic_gaussian_deep_in_the_tail(sigma, steps, interval):
    """k copies of one q = 1 step, composed by the FFT machinery (not merged first), down to δ = 1e-12."""
    step = pl.discretize_step(sigma, 1.0, interval, 1e-25)[pl.REMOVE]
    mu = math.sqrt(steps) / sigma
    for delta in (1e-3, 1e-7, 1e-12):
        rdp = pl.history_rdp([(sigma, 1.0, steps)])
        window, tilt = pl.plan_window(rdp, [(step, steps)], tail_mass=1e-25, window_error=1e-20, delta=delta)
        composed = pl.compose([(step, steps)], window, 0.0, tilt)
        exact = gaussian_epsilon(delta, mu)
        # pessimistic, by about steps·interval²/8 in the mean (the connect-the-dots bias)
        assert composed.delta(exact) >= delta * (1 - 1e-6)
        assert composed.delta(exact) <= delta * (1 + 1e-3)
        assert exact - 1e-9 <= composed.epsilon(delta) <= exact + steps * interval**2


# dp_accounting 0.6 with NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval 1e-4
# (connect-the-dots, the same discretisation): ε for these histories and δ, or δ at ε.
DP_ACCOUNTING_EPSILONS = [
    ([(1.0, 0.01, 1000)], 1e-5, 1.828243645591767),
    ([(1.0, 0.001, 100000)], 1e-5, 1.6380285586406922),
    ([(1.0, 0.01, 100000)], 1e-5, 25.573272725081022),
    ([(0.6, 0.1, 100)], 1e-8, 28.431770970077295),
    ([(1.0, 0.01, 500), (2.0, 0.05, 300), (0.8, 0.002, 2000)], 1e-6, 2.803046079710257),
]


@pytest.mark.parametrize("history, delta, expected", DP_ACCOUNTING_EPSILONS)
def test_matches_dp_accounting(history, delta, expected):
    assert pld(history).get_epsilon(delta) == pytest.approx(expected, abs=1e-6)


def test_get_delta_matches_dp_accounting():
    # dp_accounting 0.6, ADD_OR_REMOVE_ONE, interval 1e-4: get_delta_for_epsilon(1.0) after (σ=1, q=0.01) × 1000
    assert pld([(1.0, 0.01, 1000)]).get_delta(1.0) == pytest.approx(0.0026124968063012967, rel=1e-6)


def test_get_delta_and_get_epsilon_are_inverse():
    acc = pld([(0.9, 0.02, 2000), (1.5, 0.05, 300)])
    for delta in (1e-3, 1e-6, 1e-10):
        eps = acc.get_epsilon(delta)
        assert acc.get_delta(eps) == pytest.approx(delta, rel=1e-6)
    deltas = [acc.get_delta(e) for e in (0.5, 1.0, 2.0, 4.0)]
    assert deltas == sorted(deltas, reverse=True)


def test_heterogeneous_history_does_not_depend_on_order_or_splitting():
    segments = [(1.0, 0.01, 300), (0.7, 0.05, 40), (2.0, 0.2, 100), (1.3, 1.0, 5)]
    expected = pld(segments).get_epsilon(1e-6)
    for order in itertools.permutations(segments):
        assert pld(order).get_epsilon(1e-6) == pytest.approx(expected, rel=1e-9)
    split = [(1.0, 0.01, 100), (0.7, 0.05, 40), (1.0, 0.01, 200), (2.0, 0.2, 100), (1.3, 1.0, 2), (1.3, 1.0, 3)]
    assert pld(split).get_epsilon(1e-6) == pytest.approx(expected, rel=1e-9)


def test_below_the_rdp_bound():
    for history in ([(1.0, 0.01, 1000)], [(0.8, 0.1, 50), (2.0, 0.02, 5000)], [(0.5, 1.0, 3)]):
        rdp = RDPAccountant()
        rdp.history = list(history)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # order-edge notes
            bound = rdp.get_epsilon(1e-6)
        assert pld(history).get_epsilon(1e-6) < bound


# ---------------------------------------------------------------- robustness and edge cases


@pytest.mark.parametrize(
    "history",
    [
        [(0.3, 0.01, 1000)],  # ε ≈ 70
        [(0.3, 1.0, 1)],
        [(0.3, 1.0, 10**6)],  # ε ≈ 5.6e6: the lattice is coarsened, the result stays an upper bound
        [(1.0, 1e-5, 10**6)],
        [(0.5, 0.1, 10**6)],  # Opacus 1.6's PRV tries to allocate 336 GiB here
        [(0.8, 1.0, 1000)],  # Opacus 1.6's PRV returns inf here
    ],
)
def test_extreme_inputs_give_finite_valid_bounds(history):
    eps = pld(history).get_epsilon(1e-5)
    assert 0 < eps < math.inf
    sigma, q, steps = history[0]
    if q == 1.0:
        assert eps >= gaussian_epsilon(1e-5, math.sqrt(steps) / sigma) - 1e-9


def test_coarse_interval_stays_pessimistic():
    exact = gaussian_epsilon(1e-6, math.sqrt(50) / 1.2)
    eps = pld([(1.2, 1.0, 50)], interval=0.05).get_epsilon(1e-6)
    assert exact <= eps <= exact + 0.05


def test_degenerate_histories():
    assert pld([]).get_epsilon(1e-5) == 0.0
    assert pld([]).get_delta(1.0) == 0.0
    assert pld([(math.inf, 0.5, 100), (1.0, 0.1, 0)]).get_epsilon(1e-5) == 0.0
    assert pld([(0.0, 0.1, 1), (1.0, 0.1, 10)]).get_epsilon(1e-5) == math.inf
    assert pld([(0.0, 0.1, 1)]).get_delta(1.0) == 1.0
    acc = PLDAccountant()
    assert acc.mechanism() == "pld" and acc.get_epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert 0 < acc.get_epsilon(1e-5) < math.inf


@pytest.mark.parametrize("interval", [0, -1e-4, math.nan, math.inf, "1e-4", None])
def test_bad_interval(interval):
    with pytest.raises(ValueError, match="value_discretization_interval"):
        PLDAccountant(value_discretization_interval=interval)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan, 2])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        pld([(1.0, 0.01, 10)]).get_epsilon(delta)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.nan, math.inf])
def test_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        pld([(1.0, 0.01, 10)]).get_delta(epsilon)


def test_bad_history_names_the_field():
    with pytest.raises(ValueError, match="sample_rate"):
        pld([(1.0, 1.5, 10)]).get_epsilon(1e-5)
