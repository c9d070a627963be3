"""PRV and PLD agree: two different error controls on the same composition.

PRV brackets the true ε(δ) within ±eps_error; PLD is an upper bound whose
pessimism is second order in its interval. So on every history PLD must lie
inside PRV's bracket (up to that small pessimism), and within eps_error of PRV's
estimate.
"""

import itertools
import math

import pytest
from scipy import optimize, stats

from fastdp.accountants.pld import PLDAccountant
from fastdp.accountants.prv import PRVAccountant

EPS_ERROR = 0.01


def epsilons(history, delta):
    prv, pld = PRVAccountant(), PLDAccountant()
    prv.history = pld.history = list(history)
    return prv.compute_epsilon(delta, eps_error=EPS_ERROR), pld.get_epsilon(delta)


def gaussian_epsilon(delta, mu):
    """Analytic Gaussian mechanism (Balle & Wang 2018), independent of fastdp."""
    delta_of = lambda e: stats.norm.cdf(mu / 2 - e / mu) - math.exp(e + stats.norm.logcdf(-mu / 2 - e / mu))
    return optimize.brentq(lambda e: delta_of(e) - delta, 0, mu * mu / 2 + 40 * mu + 40, xtol=1e-12)


GRID = list(itertools.product([0.6, 1.0, 2.0], [0.001, 0.01, 0.1, 1.0], [1, 100, 3000], [1e-5, 1e-8]))


@pytest.mark.parametrize("sigma, q, steps, delta", GRID)
def test_pld_lies_in_the_prv_bracket(sigma, q, steps, delta):
    (lower, estimate, upper), pld = epsilons([(sigma, q, steps)], delta)
    assert lower <= pld <= upper
    assert abs(pld - estimate) <= EPS_ERROR
    if q == 1.0:  # both against the closed form: PRV brackets it, PLD never goes below it
        exact = gaussian_epsilon(delta, math.sqrt(steps) / sigma)
        assert lower <= exact <= upper
        assert exact - 1e-9 <= pld <= exact + 1e-3


@pytest.mark.parametrize(
    "history, delta",
    [
        ([(1.0, 0.01, 500), (2.0, 0.05, 300), (0.8, 0.002, 2000)], 1e-6),
        ([(0.7, 0.02, 1000), (0.7, 1.0, 3), (3.0, 0.3, 200)], 1e-5),
        ([(0.5, 0.001, 20000), (1.5, 0.1, 50)], 1e-9),
    ],
)
def test_agreement_on_heterogeneous_histories(history, delta):
    (lower, estimate, upper), pld = epsilons(history, delta)
    assert lower <= pld <= upper
    assert abs(pld - estimate) <= EPS_ERROR
