"""Rényi DP accountant (Mironov 2017; sampled Gaussian of Mironov, Talwar, Zhang 2019)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .accountant import IAccountant
from .analysis.rdp import DEFAULT_ALPHAS, compute_rdp, get_privacy_spent
from .validation import check_delta


class RDPAccountant(IAccountant):
    """ε from the RDP curve of the history, converted with Balle et al. 2020 (Thm 21).

    A valid upper bound; usually 5–15% looser than PRV/PLD, but cheap and exact
    to floating precision.
    """

    DEFAULT_ALPHAS = DEFAULT_ALPHAS

    @classmethod
    def mechanism(cls) -> str:
        return "rdp"

    def get_privacy_spent(
        self, *, delta: float, alphas: Optional[Sequence[float]] = None
    ) -> Tuple[float, float]:
        """(ε, best order α) for the whole history; (0.0, nan) for an empty one."""
        delta = check_delta(delta)
        history = self._checked_history()
        if not history:
            return 0.0, float("nan")
        orders = self.DEFAULT_ALPHAS if alphas is None else list(alphas)
        rdp = sum(
            compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
            for sigma, q, steps in history
        )
        return get_privacy_spent(orders=orders, rdp=np.asarray(rdp), delta=delta)

    def get_epsilon(self, delta: float, alphas: Optional[Sequence[float]] = None) -> float:
        """An upper bound on ε(δ) for the whole history (0.0 if it is empty), at the best of ``alphas``
        (default: orders 1.1–10.9 in steps of 0.1 and 12–63)."""
        return self.get_privacy_spent(delta=delta, alphas=alphas)[0]
