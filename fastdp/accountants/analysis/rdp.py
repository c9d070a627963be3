"""Rényi DP of the Poisson-subsampled Gaussian mechanism.

RDP of order α is log(A_α)/(α-1) with A_α = E_{x~μ0}[(1 - q + q·L(x))^α],
μ0 = N(0, σ²), L(x) = N(1, σ²)(x)/μ0(x) = exp((2x - 1)/(2σ²))
(Mironov, Talwar, Zhang 2019). Both evaluations below compute A_α - 1 directly,
so that log A_α keeps full relative precision when the sample rate is tiny and
A_α is within 1e-12 of 1:

- integer α: the finite binomial sum, whose i = 0, 1 terms cancel against 1;
- fractional α: the trapezoidal rule on a uniform grid, which converges
  exponentially fast for this integrand (analytic in a strip of half-width πσ²
  around the real axis, Gaussian tails). It agrees with the Mironov et al.
  fractional series where that converges, and stays fast and exact at q → 1,
  where the series' tail decays only polynomially.

Conversion to (ε, δ): Balle et al. 2020, "Hypothesis testing interpretations
and Rényi DP", Theorem 21. Everything is vectorised over orders with numpy.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence, Tuple

import numpy as np
from scipy import special

DEFAULT_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

# Trapezoid on an integrand analytic in |Im x| < d errs by about
# exp(-2πd/h + d²/(2σ²)) relative to A; d = c·σ, c ≤ 0.9πσ keeps clear of the
# singularities at Im x = πσ². _LOG_TARGET = 55 puts that error near 1e-24.
_LOG_TARGET = 55.0
_TAIL_SIGMAS = 12.0  # integrate over [-12σ, max(α, 1) + 12σ]: both Gaussian bumps
# The step shrinks like σ² for small σ; beyond this many grid points fractional orders use the
# convexity bound below instead (only at σ ≲ 0.05, where ε is in the hundreds anyway).
MAX_QUADRATURE_POINTS = 1 << 16


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_α for integer α ≥ 2 via A_α - 1 = sum_{i≥2} C(α,i) q^i (1-q)^(α-i) expm1((i²-i)/(2σ²))."""
    i = np.arange(2, int(alphas.max()) + 1, dtype=float)[None, :]
    a = alphas[:, None]
    valid = i <= a
    log_binom = special.gammaln(a + 1) - special.gammaln(i + 1) - special.gammaln(np.maximum(a - i, 0) + 1)
    exponent = (i * i - i) / (2 * sigma**2)
    log_expm1 = np.where(exponent > 30, exponent, np.log(np.expm1(np.minimum(exponent, 30))))
    log_terms = log_binom + i * math.log(q) + (a - i) * math.log1p(-q) + log_expm1
    log_a_minus_1 = special.logsumexp(np.where(valid, log_terms, -np.inf), axis=1)
    return np.logaddexp(0.0, log_a_minus_1)


def _quadrature_grid(sigma: float, alphas: np.ndarray) -> tuple:
    """(step, number of points) of the trapezoid for these orders."""
    c = min(0.9 * math.pi * sigma, math.sqrt(2 * _LOG_TARGET))
    h = 2 * math.pi * c * sigma / (_LOG_TARGET + c * c / 2)
    return h, (max(alphas.max(), 1.0) + 2 * _TAIL_SIGMAS * sigma) / h


def _log_a_convex_bound(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """An upper bound on log A_α: log A_α is convex in α (a log-moment), with log A_1 = 0, so it lies
    below the chord between the neighbouring integer orders, which are computed exactly."""
    low = np.floor(alphas).astype(int)
    orders = np.arange(2, low.max() + 2, dtype=float)
    log_a = np.concatenate([[0.0], _log_a_integer(q, sigma, orders)])  # log_a[k - 1] = log A_k
    below, above = log_a[low - 1], log_a[low]
    return below + (alphas - low) * (above - below)


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_α for any real α > 1 by the trapezoidal rule (see the module docstring); for tiny σ,
    where the grid would be too fine, the (valid, slightly larger) convexity bound."""
    h, points = _quadrature_grid(sigma, alphas)
    if points > MAX_QUADRATURE_POINTS:
        return _log_a_convex_bound(q, sigma, alphas)
    x = np.arange(-_TAIL_SIGMAS * sigma, max(alphas.max(), 1.0) + _TAIL_SIGMAS * sigma + h, h)
    log_l = (2 * x - 1) / (2 * sigma**2)
    log_weight = -x * x / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)) + math.log(h)
    log_mix = np.logaddexp(math.log1p(-q), math.log(q) + log_l)  # log(1 - q + qL)
    a = alphas[:, None]
    log_terms = log_weight + a * log_mix
    log_a = special.logsumexp(log_terms, axis=1)
    near_one = log_a < 1.0
    if near_one.any():
        # A - 1 = E[(1-q+qL)^α - 1 - αq(L-1)], since E[L - 1] = 0: no cancellation against 1.
        a1 = a[near_one]
        weight = np.exp(log_weight)
        with np.errstate(over="ignore", invalid="ignore"):
            integrand = np.where(
                a1 * log_mix < 30,
                weight * (np.expm1(a1 * log_mix) - a1 * q * np.expm1(log_l)),
                np.exp(log_terms[near_one]) - weight - a1 * q * (np.exp(log_weight + log_l) - weight),
            )
        log_a[near_one] = np.log1p(integrand.sum(axis=1))
    return log_a


def _rdp_one_step(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    if sigma == 0:
        return np.full(alphas.shape, np.inf)
    if math.isinf(sigma):
        return np.zeros(alphas.shape)
    if q == 1.0:
        return alphas / (2 * sigma**2)
    log_a = np.empty(alphas.shape)
    integer = alphas == np.floor(alphas)
    if integer.any():
        log_a[integer] = _log_a_integer(q, sigma, alphas[integer])
    if (~integer).any():
        log_a[~integer] = _log_a_fractional(q, sigma, alphas[~integer])
    return log_a / (alphas - 1)


def compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """RDP at each order after ``steps`` compositions of the subsampled Gaussian."""
    alphas = np.atleast_1d(np.asarray(orders, dtype=float))
    if np.any(alphas <= 1):
        raise ValueError(f"orders must all be > 1, got min {alphas.min()}")
    if steps == 0 or q == 0:
        return np.zeros(alphas.shape)
    return _rdp_one_step(float(q), float(noise_multiplier), alphas) * steps


def get_privacy_spent(*, orders: Sequence[float], rdp, delta: float) -> Tuple[float, float]:
    """(ε, best order) by Balle et al. 2020 Thm 21, minimised over the orders.

    Warns when the best order is the smallest or largest one: a wider range of
    orders might give a smaller (still valid) ε.
    """
    alphas = np.atleast_1d(np.asarray(orders, dtype=float))
    rdp = np.atleast_1d(np.asarray(rdp, dtype=float))
    if alphas.shape != rdp.shape:
        raise ValueError(f"orders and rdp must have the same length, got {alphas.shape} and {rdp.shape}")
    with np.errstate(invalid="ignore"):
        eps = rdp - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.all(np.isnan(eps)) or np.all(np.isinf(rdp)):
        return math.inf, math.nan
    if np.all(rdp == 0):  # no privacy loss at all (σ = ∞); the conversion alone is not tight here
        return 0.0, math.nan
    best = int(np.nanargmin(eps))
    if len(alphas) > 1 and np.isfinite(eps[best]) and best in (int(np.argmin(alphas)), int(np.argmax(alphas))):
        warnings.warn(
            f"the optimal RDP order is {alphas[best]:g}, at the edge of the orders given; "
            "extend the orders (alphas=...) for a possibly tighter epsilon",
            RuntimeWarning,
            stacklevel=2,
        )
    return max(0.0, float(eps[best])), float(alphas[best])
