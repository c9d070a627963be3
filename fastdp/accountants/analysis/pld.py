"""Privacy-loss-distribution accounting with a pessimistic (connect-the-dots) lattice.

Every step is discretised by connect-the-dots on the lattice h·Z, so each step's
lattice distribution is a dominating pair of the true one and the composition
upper-bounds the true privacy curve (Doroshenko et al. 2022). Everything cut off
is counted against us: step mass beyond the truncation bounds goes to +∞ or up
to the lowest lattice point, and a bound on what wraps around the FFT window is
added to δ.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from .privacy_loss import DIRECTIONS, ComposedLoss, Segment, compose_directions

STEP_TAIL_MASS = 1e-20  # P-mass cut from each end of one step's loss distribution
WINDOW_ERROR = 1e-16  # bound on the change of δ from what wraps around the FFT window


def compose_pessimistic(
    segments: Sequence[Segment], interval: float, *, delta: Optional[float] = None, epsilon: Optional[float] = None
) -> Dict[str, ComposedLoss]:
    """Pessimistic composed losses of a (reduced, non-empty) history, in both directions.

    Planned for a query at ``delta`` or ``epsilon``. The lattice is coarsened
    only where the requested one would need more points than memory allows; the
    result stays an upper bound.
    """
    composed, _ = compose_directions(
        segments,
        interval=interval,
        tail_mass=STEP_TAIL_MASS,
        window_error=WINDOW_ERROR,
        fallback="accountant='rdp'",
        extra_infinity_mass=WINDOW_ERROR,
        delta=delta,
        epsilon=epsilon,
    )
    return composed


def epsilon(segments: Sequence[Segment], interval: float, delta: float) -> float:
    """ε(δ) under add-or-remove adjacency: the larger of the two directions."""
    composed = compose_pessimistic(segments, interval, delta=delta)
    return max(composed[direction].epsilon(delta) for direction in DIRECTIONS)


def delta(segments: Sequence[Segment], interval: float, epsilon: float) -> float:
    """δ(ε) under add-or-remove adjacency: the larger of the two directions."""
    composed = compose_pessimistic(segments, interval, epsilon=epsilon)
    return max(composed[direction].delta(epsilon) for direction in DIRECTIONS)
