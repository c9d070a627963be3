"""Privacy-loss-distribution accountant ("pld"): pessimistic, tight, FFT composition."""

from __future__ import annotations

import math

from .accountant import IAccountant
from .analysis import pld as analysis
from .analysis.privacy_loss import reduce_history
from .validation import check_delta, check_epsilon


class PLDAccountant(IAccountant):
    """ε(δ) and δ(ε) from the privacy-loss distribution of the history.

    Each step is discretised by connect-the-dots on a lattice of spacing
    ``value_discretization_interval`` (Doroshenko et al. 2022), which makes the
    result an upper bound on the true privacy curve whose mean loss is off by at
    most steps·interval²/8, far tighter than rounding losses up. (It is looser
    when one step's loss spreads over less than an interval, e.g. q ≲ 1e-4 at
    the default interval, as in dp_accounting.) Both directions of
    add-or-remove adjacency are composed and the worse one is reported.
    """

    def __init__(self, value_discretization_interval: float = 1e-4):
        super().__init__()
        self.value_discretization_interval = check_epsilon(
            value_discretization_interval, "value_discretization_interval"
        )

    @classmethod
    def mechanism(cls) -> str:
        return "pld"

    def _segments(self):
        """The history reduced for composition: None if some step has no noise, [] if nothing leaks."""
        return reduce_history(self._checked_history())

    def get_epsilon(self, delta: float) -> float:
        """The smallest ε with δ(ε) ≤ delta for the whole history (0.0 if it is empty)."""
        delta = check_delta(delta)
        segments = self._segments()
        if segments is None:
            return math.inf
        return analysis.epsilon(segments, self.value_discretization_interval, delta) if segments else 0.0

    def get_delta(self, epsilon: float) -> float:
        """δ(ε) of the whole history (0.0 if it is empty)."""
        epsilon = check_epsilon(epsilon, "epsilon")
        segments = self._segments()
        if segments is None:
            return 1.0
        return analysis.delta(segments, self.value_discretization_interval, epsilon) if segments else 0.0
