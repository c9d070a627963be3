"""Gaussian DP by the central limit theorem (Bu, Dong, Long, Su 2020; Dong, Roth, Su 2019).

n steps of the subsampled Gaussian are approximated by one μ-GDP mechanism.
This is an *approximation* that can under-report ε (most at large sample
rates or few steps); use it to compare with the literature, never as the
default accountant.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special  # special.ndtr is scipy.stats.norm.cdf without importing scipy.stats (0.7 s)


def _expm1_inverse_sq(noise_multiplier: float) -> float:
    """exp(σ⁻²) - 1, inf when it overflows (σ tiny)."""
    if noise_multiplier == 0:
        return math.inf
    exponent = noise_multiplier ** -2
    return math.inf if exponent > 700 else math.expm1(exponent)


def mu_squared_poisson(*, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """μ² of ``steps`` Poisson-subsampled Gaussian steps (μ² adds up under composition)."""
    return sample_rate**2 * steps * _expm1_inverse_sq(noise_multiplier)


def mu_squared_uniform(*, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """μ² for uniform subsampling without replacement (Bu et al. 2020, Thm 3)."""
    sigma = noise_multiplier
    if sigma == 0:
        return math.inf
    inner = math.exp(sigma**-2) * special.ndtr(1.5 / sigma) + 3 * special.ndtr(-0.5 / sigma) - 2 if sigma**-2 < 700 else math.inf
    return 2 * sample_rate**2 * steps * inner


def delta_from_mu(*, epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (the second term in log space)."""
    if mu == 0:
        return 0.0
    return float(special.ndtr(-epsilon / mu + mu / 2) - np.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2)))


def eps_from_mu(*, mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ delta for μ-GDP."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if delta_from_mu(epsilon=0.0, mu=mu) <= delta:
        return 0.0
    high = max(1.0, mu * mu)
    while delta_from_mu(epsilon=high, mu=mu) > delta:
        high *= 2
    return optimize.brentq(lambda e: delta_from_mu(epsilon=e, mu=mu) - delta, 0.0, high, xtol=1e-12)
