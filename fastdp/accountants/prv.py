"""Privacy-random-variable accountant ("prv"): numerical composition with error bars."""

from __future__ import annotations

import math
from typing import Optional, Tuple

from .accountant import IAccountant
from .analysis import prv as analysis
from .analysis.privacy_loss import reduce_history
from .validation import check_delta, check_epsilon


class PRVAccountant(IAccountant):
    """ε from the numerically composed privacy loss of the history (Gopi, Lee, Wutschitz 2021).

    ``get_epsilon`` returns an upper bound on the true ε(δ) of the history, at
    most ~2·eps_error above it; ``compute_epsilon`` also returns the lower bound
    and the point estimate. Both directions of add-or-remove adjacency are
    composed and the worse one is reported.
    """

    @classmethod
    def mechanism(cls) -> str:
        return "prv"

    def compute_epsilon(
        self, delta: float, *, eps_error: float = 0.01, delta_error: Optional[float] = None
    ) -> Tuple[float, float, float]:
        """(lower bound, estimate, upper bound) on ε(δ); ``delta_error`` defaults to δ/1000."""
        delta = check_delta(delta)
        eps_error = check_epsilon(eps_error, "eps_error")
        if delta_error is None:
            delta_error = delta / 1000
        delta_error = check_delta(delta_error, "delta_error")
        if delta_error >= delta:
            raise ValueError(f"delta_error must be < delta = {delta}, got {delta_error}")
        segments = reduce_history(self._checked_history())
        if segments is None:
            return math.inf, math.inf, math.inf
        if not segments:
            return 0.0, 0.0, 0.0
        composed, error = analysis.compose_with_error(segments, eps_error, delta, delta_error)
        return analysis.epsilon_bounds(composed, error, delta, delta_error)

    def get_epsilon(self, delta: float, *, eps_error: float = 0.01, delta_error: Optional[float] = None) -> float:
        """An upper bound on ε(δ) for the whole history (0.0 if it is empty)."""
        return self.compute_epsilon(delta, eps_error=eps_error, delta_error=delta_error)[2]
