"""Privacy-random-variable accounting with error bars (Gopi, Lee, Wutschitz 2021).

The privacy loss of each step is discretised on a mesh h and the discretised
losses are composed exactly (up to floating point); the discretisation is paid
for with an explicit error (ε_err, δ_err) instead of pessimism:

    δ_true(ε + ε_err) - δ_err ≤ δ_computed(ε) ≤ δ_true(ε - ε_err) + δ_err,

so that [ε_c(δ + δ_err) - ε_err, ε_c(δ - δ_err) + ε_err] brackets the true ε(δ).

How δ_err and ε_err are spent (k = total number of steps):

* mesh (δ_err/2): given the true losses, the per-step rounding errors are
  independent, each within an interval as wide as the cell it rounds in and,
  for connect-the-dots, of mean in [0, width²/8]. Hoeffding then bounds their
  sum by t = sqrt(W·log(2/δ_H)/2) except with probability δ_H, where W is the
  sum of the squared cell widths; with the means, ε_err = t + W/8. With one
  mesh h, W = k·h² and h ∝ ε_err/sqrt(k), as in the paper.
  Refinement used for long histories: the two far ends of each step's support,
  which hold at most 1/k of its mass, get a mesh r·h. Then W ≤ (k + n·(r² - 1))·h²
  unless more than n of the k steps land there, whose probability (a
  Poisson-binomial tail of mean ≤ 1) is bounded by δ_err/8 and taken out of δ_H.
  With r² - 1 ≈ k/(10n) this costs 5% of mesh and removes most lattice points.
* truncation (δ_err/4): each step loses at most δ_err/(8k) of P-mass beyond
  each end of its support (to +∞ above, to the lowest lattice point below: this
  never lowers the loss, so it only enters the lower bound).
* window (δ_err/4): the composition is computed modulo a window planned from
  Chernoff bounds (``privacy_loss.plan_window``) so that what wraps around moves
  δ by at most δ_err/4.

The paper rounds to the nearest point and then shifts by the mean error; with
connect-the-dots the mean error is at most width²/8 by construction, so no mean
has to be computed numerically (the step that fails for large ε in other
implementations).
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

from .privacy_loss import DIRECTIONS, ComposedLoss, Segment, compose_directions


def _round_down_log_grid(value: float, per_octave: int) -> float:
    """The largest 2^(j/per_octave) ≤ value: nearby requests share a cached discretisation."""
    return 2.0 ** (math.floor(math.log2(value) * per_octave) / per_octave)


def _count_bound(mean: float, failure: float) -> int:
    """An n with P[N > n] ≤ failure for any sum N of independent Bernoullis with E[N] ≤ mean.

    Chernoff: P[N ≥ n] ≤ e^(-mean)·(e·mean/n)^n for n ≥ mean.
    """
    n = max(1, math.ceil(mean))
    while -mean + n * (1 + math.log(mean / n)) > math.log(failure):
        n += 1
    return n - 1  # P[N > n - 1] = P[N ≥ n]


def compose_with_error(
    segments: Sequence[Segment], eps_error: float, delta: float, delta_error: float
) -> Tuple[Dict[str, ComposedLoss], float]:
    """Composed losses of a (reduced, non-empty) history and the ε error they carry.

    The returned ε error is at most ``eps_error`` unless the mesh it asks for
    would not fit in memory, in which case the mesh is coarsened and the
    (larger) error of the mesh actually used is returned: the bounds stay
    valid, only wider.
    """
    total_steps = sum(count for _, _, count in segments)
    step_tail_mass = 10.0 ** (math.floor(4 * math.log10(delta_error / (8 * total_steps))) / 4)
    count_failure = delta_error / 8
    log_term = math.log(2 / (delta_error / 2 - count_failure))  # Hoeffding, with δ_H = 3δ_err/8
    rare_mass = 1.0 / total_steps
    rare_steps = _count_bound(total_steps * (rare_mass + step_tail_mass), count_failure)
    ratio = max(1, math.isqrt(1 + total_steps // (10 * rare_steps)))
    if ratio == 1:
        rare_mass, width_sum = 0.0, total_steps
    else:
        width_sum = total_steps + rare_steps * (ratio**2 - 1)  # bound on Σ (cell width / h)²
    # t + W·h²/8 ≤ ε_err with t = h·sqrt(W·log_term/2) ⇔ t·(1 + t/(4·log_term)) ≤ ε_err.
    t = eps_error / (1 + eps_error / (4 * log_term))
    mesh = _round_down_log_grid(t / math.sqrt(width_sum * log_term / 2), per_octave=8)
    composed, mesh = compose_directions(
        segments,
        interval=mesh,
        tail_mass=step_tail_mass,
        window_error=delta_error / 4,
        fallback="accountant='pld' or 'rdp'",
        rare_mass=rare_mass,
        ratio=ratio,
        delta=delta,
    )
    return composed, mesh * math.sqrt(width_sum * log_term / 2) + width_sum * mesh**2 / 8


def epsilon_bounds(
    composed: Dict[str, ComposedLoss], eps_error: float, delta: float, delta_error: float
) -> Tuple[float, float, float]:
    """(lower, estimate, upper) for ε(δ) under add-or-remove adjacency (max over directions)."""

    def worst(target: float) -> float:
        return max(composed[direction].epsilon(target) for direction in DIRECTIONS)

    lower = max(0.0, worst(delta + delta_error) - eps_error)
    return lower, worst(delta), worst(delta - delta_error) + eps_error
