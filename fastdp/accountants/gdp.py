"""Gaussian DP accountant ("gdp"): CLT approximation, documented as possibly optimistic."""

from __future__ import annotations

import math

from .accountant import IAccountant
from .analysis.gdp import eps_from_mu, mu_squared_poisson, mu_squared_uniform
from .validation import check_delta


class GaussianAccountant(IAccountant):
    """ε from the central-limit μ of the history (μ² adds across segments).

    Approximate: the CLT can under-report ε, most at large sample rates and
    few steps. Prefer "prv" or "pld"; "rdp" for a cheap valid bound.
    """

    is_upper_bound = False

    @classmethod
    def mechanism(cls) -> str:
        return "gdp"

    def get_mu(self, poisson: bool = True) -> float:
        """μ of the whole history: Poisson subsampling, or (``poisson=False``) uniform subsampling
        without replacement (Bu et al. 2020, Thm 3)."""
        mu_squared = mu_squared_poisson if poisson else mu_squared_uniform
        total = sum(
            mu_squared(noise_multiplier=sigma, sample_rate=q, steps=steps)
            for sigma, q, steps in self._checked_history()
        )
        return math.sqrt(total)

    def get_epsilon(self, delta: float, poisson: bool = True) -> float:
        """ε(δ) of μ-GDP with ``get_mu(poisson)``: an approximation that can be below the true ε."""
        delta = check_delta(delta)
        return eps_from_mu(mu=self.get_mu(poisson=poisson), delta=delta)
