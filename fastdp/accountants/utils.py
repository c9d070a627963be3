"""Calibrating σ to a privacy budget."""

from __future__ import annotations

import math
import warnings
from typing import Optional

from .registry import create_accountant
from .validation import check_delta, check_epsilon, check_sample_rate, check_steps

MAX_SIGMA = 1e6
SIGMA_RESOLUTION = 1e-4  # the bisection stops once σ is known to this absolute precision


def steps_from_epochs(*, epochs: Optional[float], steps: Optional[int], sample_rate: float) -> int:
    """Exactly one of ``epochs`` (→ ``int(epochs / sample_rate)`` steps, as Opacus) or ``steps``."""
    if (epochs is None) == (steps is None):
        raise ValueError("pass exactly one of epochs= or steps=")
    if steps is not None:
        return check_steps(steps)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0 or math.isinf(epochs):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    return int(epochs / sample_rate)


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    epochs: Optional[float] = None,
    steps: Optional[int] = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    **kwargs,
) -> float:
    """The smallest σ (to within ``epsilon_tolerance`` in ε) whose ε does not exceed the target.

    With an accountant whose ε is an approximation (``is_upper_bound = False``: "gdp"), the σ is that
    approximation's, as in Opacus, and a warning says that its true ε can exceed the target (with
    "gdp", q = 0.1, 20 steps and a target of 2, PRV and PLD give 2.9); calibrate with "prv" or "pld"
    for a guarantee.

    Bisection on σ that only ever moves its upper end to a σ whose ε was computed
    and found below the target, so the returned σ never overshoots the budget
    under the chosen accountant. It stops when ε is within ``epsilon_tolerance``
    below the target or σ is known to ``SIGMA_RESOLUTION`` (ε can stay flat, e.g.
    at 0 when δ ≥ q for a single step, all the way down to σ = 0). ``kwargs`` go to that accountant's ``get_epsilon``
    (e.g. ``eps_error`` for PRV).
    """
    target_epsilon = check_epsilon(target_epsilon)
    target_delta = check_delta(target_delta, "target_delta")
    sample_rate = check_sample_rate(sample_rate)
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    steps = steps_from_epochs(epochs=epochs, steps=steps, sample_rate=sample_rate)
    acc = create_accountant(accountant)
    if not acc.is_upper_bound:
        warnings.warn(
            f"get_noise_multiplier(accountant={accountant!r}): that accountant's epsilon is an approximation, so "
            "the true epsilon of the returned sigma can exceed target_epsilon; use accountant='prv' or 'pld' for "
            "a sigma whose epsilon is guaranteed not to",
            UserWarning,
            stacklevel=2,
        )

    def epsilon(sigma: float) -> float:
        acc.history = [(sigma, sample_rate, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # order-edge notes on trial σ
            return acc.get_epsilon(delta=target_delta, **kwargs)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon} is not reachable with sigma <= {MAX_SIGMA:g}; "
                "raise the budget or lower the number of steps"
            )
        eps_high = epsilon(sigma_high)
    while target_epsilon - eps_high > epsilon_tolerance and sigma_high - sigma_low > SIGMA_RESOLUTION:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
