"""Privacy-loss distributions of the Poisson-subsampled Gaussian mechanism.

The numerics shared by the PRV and PLD accountants:

1. the privacy loss of one step, in both directions of add-or-remove adjacency,
   with its CDF and survival function;
2. a connect-the-dots discretisation of one step onto the lattice h·Z;
3. composition of a whole history on a circular window of that lattice, by
   multiplying characteristic functions;
4. δ(ε) and ε(δ) of the composition.

Notation. With m = 1/σ, μ0 = N(0, 1), μ1 = N(m, 1) and M = (1 - q)μ0 + qμ1, the
log-likelihood ratio is L(x) = log(dM/dμ0)(x) = log(1 - q + q·exp(m·x - m²/2)).

* "remove": the pair (P, Q) = (M, μ0), loss Y = L(X) with X ~ M;
* "add":    the pair (P, Q) = (μ0, M), loss Y = -L(X) with X ~ μ0.

In both, δ(ε) = E_P[(1 - e^(ε - Y))_+] (+ any mass at +∞). L is increasing in x,
so every probability about Y is a Gaussian probability about x at the threshold
x(t) where L(x) = t; Gaussian tails (scipy's ``ndtr`` of the negative absolute
value) keep full relative precision far out.

Connect-the-dots (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022). The loss
mass P(cell) of each lattice cell [g, g + h] is split between its two end points
so that both the P-mass and the Q-mass (the mass of e^(-Y) under P) are kept.
That pair is a dominating pair of the step (its privacy curve is the chord
interpolation of the true curve in e^ε, which is convex), so composing it is
pessimistic, and the discretised loss exceeds the true one by at most h²/8 on
average per step: the bias is second order in h, not the h/2 per step of
rounding up. Mass beyond the truncation bounds goes up: to +∞ above, to the
lowest lattice point below.

Composition. The total loss lives on the same lattice; it is computed modulo
the width of a window, by multiplying the steps' characteristic functions. The
window comes from Chernoff bounds (the history's Rényi DP plus what the
discretisation can add), so that what wraps around moves δ by a set amount at
most. The distributions are tilted by e^(θ·loss), θ at the query's saddle
point, before composing, and un-tilted when δ is read off: FFT round-off,
amplified k-fold by the powering, then stays relative to δ instead of an
absolute floor of ~k·1e-16 (which swamps δ ≤ 1e-10 after 1e5 steps).

For long histories the composed characteristic function is negligible beyond a
low frequency (bounded rigorously from each step's total variation), so only
those few coefficients are computed, from Taylor-expanded block moments of each
step, and δ(ε) is evaluated from them in closed form: the cost does not depend
on how fine the lattice is. Otherwise all coefficients come from real FFTs and
δ(ε) is read off the composed pmf.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import fft as sp_fft
from scipy import optimize, special

from .rdp import compute_rdp

REMOVE = "remove"
ADD = "add"
DIRECTIONS = (REMOVE, ADD)

# (noise_multiplier, sample_rate, number of steps), with 0 < σ < ∞ and 0 < q ≤ 1.
Segment = Tuple[float, float, int]


# ----------------------------------------------------------------------------
# 1. The privacy loss of one step
# ----------------------------------------------------------------------------


def _log_e_t_minus(t: np.ndarray, q: float) -> np.ndarray:
    """log(e^t - (1 - q)) for sorted t, accurate near t = 0 and for large t; -inf below log(1 - q)."""
    out = np.full(t.shape, -np.inf)
    one_minus_q = 1.0 - q
    lo = np.searchsorted(t, -0.5, side="right")
    hi = np.searchsorted(t, 1.0, side="right")
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:lo] = np.log(np.exp(t[:lo]) - one_minus_q)
        out[lo:hi] = np.log(np.expm1(t[lo:hi]) + q)
        out[hi:] = t[hi:] + np.log1p(-one_minus_q * np.exp(-t[hi:]))
    out[np.isnan(out)] = -np.inf
    return out


def _threshold_sorted(t: np.ndarray, sigma: float, q: float) -> np.ndarray:
    m = 1.0 / sigma
    return (_log_e_t_minus(t, q) - math.log(q)) / m + m / 2


def loss_threshold(t, sigma: float, q: float) -> np.ndarray:
    """The x at which L(x) = t (-inf where t ≤ log(1 - q), which L never reaches)."""
    t = np.asarray(t, dtype=float)
    flat = t.ravel()
    order = np.argsort(flat, kind="stable")
    x = np.empty_like(flat)
    x[order] = _threshold_sorted(flat[order], sigma, q)
    return x.reshape(t.shape)


def privacy_loss(x, sigma: float, q: float) -> np.ndarray:
    """L(x) = log(1 - q + q·exp(x/σ - 1/(2σ²))), the remove-direction loss at x."""
    m = 1.0 / sigma
    log_ratio = math.log(q) + m * np.asarray(x, dtype=float) - m * m / 2
    if q == 1.0:
        return log_ratio
    return np.logaddexp(math.log1p(-q), log_ratio)


def loss_cdf(t, sigma: float, q: float, direction: str) -> np.ndarray:
    """P[Y ≤ t] for the privacy loss Y of one step (X drawn from P of that direction)."""
    if direction == REMOVE:  # Y = L(X) ≤ t  ⇔  X ≤ x(t), X ~ M
        x = loss_threshold(t, sigma, q)
        return (1 - q) * special.ndtr(x) + q * special.ndtr(x - 1.0 / sigma)
    if direction == ADD:  # Y = -L(X) ≤ t  ⇔  X ≥ x(-t), X ~ μ0
        return special.ndtr(-loss_threshold(-np.asarray(t, dtype=float), sigma, q))
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def loss_sf(t, sigma: float, q: float, direction: str) -> np.ndarray:
    """P[Y > t], computed from the Gaussian tails (not 1 - CDF), so it stays exact far out."""
    m = 1.0 / sigma
    if direction == REMOVE:
        x = loss_threshold(t, sigma, q)
        return (1 - q) * special.ndtr(-x) + q * special.ndtr(m - x)
    if direction == ADD:
        return special.ndtr(loss_threshold(-np.asarray(t, dtype=float), sigma, q))
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


# ----------------------------------------------------------------------------
# 2. Connect-the-dots discretisation of one step
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Point masses at the lattice points first + stride·j, j = 0, 1, ..."""

    first: int
    stride: int
    masses: np.ndarray

    def offsets(self, origin: int) -> np.ndarray:
        """The points' lattice indices counted from ``origin``."""
        return self.first - origin + self.stride * np.arange(len(self.masses))


@dataclass(frozen=True)
class LatticeLoss:
    """A privacy-loss distribution on the lattice interval·Z.

    ``pmf[i]`` is the mass at (start + i)·interval; ``tails`` hold the masses at
    the ends of the support where a coarser mesh was used (strided runs);
    ``infinity_mass`` is the mass at +∞. The summaries that composition needs
    are computed once, here.
    """

    interval: float
    start: int
    pmf: np.ndarray
    infinity_mass: float
    tails: Tuple[Run, ...] = ()

    def runs(self) -> Tuple[Run, ...]:
        return (Run(self.start, 1, self.pmf),) + self.tails

    def __post_init__(self):
        for run in self.runs():
            run.masses.setflags(write=False)
        tails_total = sum(float(run.masses.sum()) for run in self.tails)
        mass = float(self.pmf.sum()) + tails_total
        tv1, tv2 = _total_variations(self.pmf)
        # A lone point mass p adds 2p and 4p: an upper bound on the joint variation.
        tv1, tv2 = tv1 + 2 * tails_total, tv2 + 4 * tails_total
        # Mean and variance in lattice units, counted from ``start``.
        offsets = [run.offsets(self.start).astype(float) for run in self.runs()]
        masses = [run.masses for run in self.runs()]
        mean = sum(np.dot(o, m) for o, m in zip(offsets, masses)) / mass if mass > 0 else 0.0
        variance = sum(np.dot((o - mean) ** 2, m) for o, m in zip(offsets, masses)) / mass if mass > 0 else 0.0
        for name, value in (("mass", mass), ("tv1", tv1), ("tv2", tv2), ("mean", mean), ("variance", variance)):
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "center", int(round(mean)))


def _total_variations(pmf: np.ndarray) -> Tuple[float, float]:
    """Σ|Δp| and Σ|Δ²p| of the sequence extended by zeros on both sides.

    They bound the characteristic function away from 0 (summation by parts).
    """
    first, last = abs(pmf[0]), abs(pmf[-1])
    if len(pmf) == 1:
        return 2 * first, 4 * first
    diff = np.subtract(pmf[1:], pmf[:-1])
    second = np.subtract(diff[1:], diff[:-1])
    tv1 = first + last + float(np.abs(diff, out=diff).sum())
    edges = first + abs(pmf[1] - 2 * pmf[0]) + abs(pmf[-2] - 2 * pmf[-1]) + last
    return tv1, edges + float(np.abs(second, out=second).sum())


def _interval_masses(x: np.ndarray) -> np.ndarray:
    """Φ(x[i+1]) - Φ(x[i]) for ascending x, from the smaller of Φ and 1 - Φ at each end."""
    small_tail = special.ndtr(-np.abs(x))  # Φ(x) left of 0, 1 - Φ(x) right of 0
    masses = np.empty(len(x) - 1)
    j = int(np.searchsorted(x, 0.0))  # x[:j] < 0 ≤ x[j:]
    if j >= 1:
        np.subtract(small_tail[1:j], small_tail[: j - 1], out=masses[: j - 1])
    np.subtract(small_tail[j:-1], small_tail[j + 1 :], out=masses[j:])
    if 1 <= j < len(x):
        masses[j - 1] = (1.0 - small_tail[j]) - small_tail[j - 1]
    return np.maximum(masses, 0.0, out=masses)


def _log_interval_masses(x_lo: np.ndarray, x_hi: np.ndarray) -> np.ndarray:
    """log(Φ(x_hi) - Φ(x_lo)) for x_lo ≥ 0, far in the tail where the masses underflow."""
    log_lo, log_hi = special.log_ndtr(-x_lo), special.log_ndtr(-x_hi)
    with np.errstate(divide="ignore"):
        return log_lo + np.log(-np.expm1(log_hi - log_lo))


def _q_masses_times_exp(q_cell: np.ndarray, p_cell: np.ndarray, lower: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Q(cell)·e^lower, where Q(cell) = μ0-mass of the cell's x-interval and lower its lowest loss.

    It lies in [P(cell)·e^(-w), P(cell)], but far right (x ≳ 37) the μ0-mass
    underflows while the P-mass does not (large 1/σ, e.g. q = 1 histories merged
    into one step); there it is recomputed in log-space, so the split below
    stays exact instead of rounding up.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = q_cell * np.exp(np.minimum(lower, 700.0))
    lost = ((q_cell == 0) & (p_cell > 0)) | (lower > 700)
    if lost.any():
        cells = np.flatnonzero(lost)
        scaled[cells] = np.exp(_log_interval_masses(np.maximum(x[cells], 0.0), x[cells + 1]) + lower[cells])
    return scaled


def _split_cells(p_cell: np.ndarray, q_times_exp_lower: np.ndarray, width) -> np.ndarray:
    """Mass of each cell sent to its lower end point (the rest goes to the upper one).

    A point mass at y in [l, l + w] splits as a = (e^(l-y) - e^(-w))/(1 - e^(-w)) to
    l and 1 - a to l + w, which keeps both its mass and its e^(-y)-moment; summed
    over the cell, a = (Q(cell)·e^l - P(cell)·e^(-w))/(1 - e^(-w)) with
    Q(cell) = E_P[e^(-Y); cell]. Written so that no factor overflows, for any w.
    """
    to_lower = q_times_exp_lower - p_cell * np.exp(-width)
    to_lower /= -np.expm1(-width)
    np.maximum(to_lower, 0.0, out=to_lower)
    return np.minimum(to_lower, p_cell, out=to_lower)


def _connect_the_dots(p_cell: np.ndarray, to_lower: np.ndarray, lower_last: bool = False) -> np.ndarray:
    """Point masses from the cells' split: cell c lies between points c and c+1.

    ``to_lower`` goes to point c and the rest to c+1; with ``lower_last`` (cells
    listed by decreasing loss) the lower end is point c+1 instead.
    """
    pmf = np.zeros(len(p_cell) + 1)
    lower, upper = (pmf[1:], pmf[:-1]) if lower_last else (pmf[:-1], pmf[1:])
    lower += to_lower
    upper += p_cell - to_lower
    return pmf


@dataclass(frozen=True)
class _EdgeLayout:
    """Lattice points of one step: every point in [fine_lo, fine_hi], every ``ratio``-th outside, out to [lo, hi]."""

    lo: int
    fine_lo: int
    fine_hi: int
    hi: int
    ratio: int

    def counts(self) -> Tuple[int, int, int]:
        below = -(-(self.fine_lo - self.lo) // self.ratio)
        above = -(-(self.hi - self.fine_hi) // self.ratio)
        return below, self.fine_hi - self.fine_lo + 1, above

    def points(self) -> np.ndarray:
        below, _, above = self.counts()
        return np.concatenate(
            (
                self.fine_lo - self.ratio * np.arange(below, 0, -1, dtype=np.int64),
                np.arange(self.fine_lo, self.fine_hi + 1, dtype=np.int64),
                self.fine_hi + self.ratio * np.arange(1, above + 1, dtype=np.int64),
            )
        )


def _edge_layout(sigma: float, q: float, interval: float, tail_mass: float, rare_mass: float, ratio: int) -> _EdgeLayout:
    """Where one step's lattice points go.

    The support is cut where the P-mass beyond each end is ≤ ``tail_mass`` (in
    both directions). With ``ratio`` > 1, the regions at both ends that hold at
    most ``rare_mass``/2 of P-mass each (in both directions) get a mesh ``ratio``
    times coarser.
    """
    m = 1.0 / sigma
    z = -special.ndtri(tail_mass)  # Φ(-z) = tail_mass
    # x ~ μ0 (add) or M (remove) puts ≤ tail_mass below -z and above m + z; at q = 1
    # only μ1 = N(m, 1) is involved (both directions), so the support starts at m - z.
    t_lo, t_hi = privacy_loss(np.array([m - z if q == 1.0 else -z, m + z]), sigma, q)
    lo = math.floor(t_lo / interval)
    hi = max(math.ceil(t_hi / interval), lo + 1)
    if ratio == 1:
        return _EdgeLayout(lo, lo, hi, hi, 1)
    # Below x_a the μ0- and M-masses are ≤ Φ(x_a) = rare/2; above x_b, μ0 has ≤ rare/4
    # and M ≤ (1-q)·rare/4 + q·Φ(m - x_b) ≤ rare/2.
    x_a = special.ndtri(rare_mass / 2)
    x_b = max(-special.ndtri(rare_mass / 4), m - special.ndtri(min(0.5, rare_mass / (4 * q))))
    t_a, t_b = privacy_loss(np.array([x_a, x_b]), sigma, q)
    fine_lo = min(max(math.floor(t_a / interval), lo), hi)
    fine_hi = max(min(math.ceil(t_b / interval), hi), fine_lo)
    return _EdgeLayout(lo, fine_lo, fine_hi, hi, ratio)


def step_points(sigma: float, q: float, interval: float, tail_mass: float, rare_mass: float = 0.0, ratio: int = 1) -> int:
    """Number of lattice points ``discretize_step`` would use (to size the lattice first)."""
    return sum(_edge_layout(sigma, q, interval, tail_mass, rare_mass, ratio).counts())


def fit_interval(segments: Sequence[Segment], interval: float, tail_mass: float, rare_mass: float = 0.0, ratio: int = 1) -> float:
    """``interval``, or the coarser one with which every step fits in MAX_STEP_POINTS lattice points.

    Scaled to fit rather than doubled, so that results stay continuous in σ (a
    σ search must not meet a jump).
    """
    while True:
        widest = max(step_points(sigma, q, interval, tail_mass, rare_mass, ratio) for sigma, q, _ in segments)
        if widest <= MAX_STEP_POINTS:
            return interval
        interval *= 1.01 * widest / MAX_STEP_POINTS


_STEP_CACHE: "OrderedDict[tuple, Dict[str, LatticeLoss]]" = OrderedDict()
_STEP_CACHE_BYTES = [0]
STEP_CACHE_LIMIT_BYTES = 256 * 2**20


def _nbytes(step: LatticeLoss) -> int:
    return sum(run.masses.nbytes for run in step.runs())


def discretize_step(
    sigma: float, q: float, interval: float, tail_mass: float, rare_mass: float = 0.0, ratio: int = 1
) -> Dict[str, LatticeLoss]:
    """Connect-the-dots distributions of one step, in both directions (cached).

    Both directions are read off the same Gaussian cell masses: the add
    direction's cells are the remove direction's, mirrored, with P and Q swapped.
    See ``_edge_layout`` for the support and the optional coarse ends.
    """
    key = (float(sigma), float(q), float(interval), float(tail_mass), float(rare_mass), int(ratio))
    cached = _STEP_CACHE.get(key)
    if cached is not None:
        _STEP_CACHE.move_to_end(key)
        return cached
    result = _discretize_step(*key)
    _STEP_CACHE[key] = result
    _STEP_CACHE_BYTES[0] += sum(_nbytes(step) for step in result.values())
    while _STEP_CACHE_BYTES[0] > STEP_CACHE_LIMIT_BYTES and len(_STEP_CACHE) > 1:
        _, old = _STEP_CACHE.popitem(last=False)
        _STEP_CACHE_BYTES[0] -= sum(_nbytes(step) for step in old.values())
    return result


def _discretize_step(
    sigma: float, q: float, interval: float, tail_mass: float, rare_mass: float, ratio: int
) -> Dict[str, LatticeLoss]:
    m = 1.0 / sigma
    layout = _edge_layout(sigma, q, interval, tail_mass, rare_mass, ratio)
    index = layout.points()
    points = index * interval  # remove-direction loss values, ascending
    x = _threshold_sorted(points, sigma, q)
    n0 = _interval_masses(x)  # μ0-mass of the x-interval of each cell
    n1 = _interval_masses(x - m)  # μ1-mass of the same interval
    mixture = (1 - q) * n0 + q * n1
    n0_below, n0_above = special.ndtr(x[0]), special.ndtr(-x[-1])
    mixture_below = (1 - q) * n0_below + q * special.ndtr(x[0] - m)
    mixture_above = (1 - q) * n0_above + q * special.ndtr(m - x[-1])
    width = interval if ratio == 1 else np.diff(points)
    below, fine, _ = layout.counts()
    dense = slice(below, below + fine)

    # remove: P = M, Q = μ0; below-support mass up to the first point, above to +∞.
    remove = _connect_the_dots(mixture, _split_cells(mixture, _q_masses_times_exp(n0, mixture, points[:-1], x), width))
    remove[0] += mixture_below
    remove = _lattice_loss(interval, index, remove, dense, mixture_above)
    if q == 1.0:  # the Gaussian loss is the same in both directions
        return {REMOVE: remove, ADD: remove}
    # add: the loss of cell [g, g'] is [-g', -g]; P = μ0, Q = M. The mass of x above
    # the support has the lowest add loss; that below has the highest (→ +∞).
    # (Q = M never underflows where P = μ0 does not, and -g' ≤ -log(1 - q) keeps e^l finite.)
    add = _connect_the_dots(n0, _split_cells(n0, mixture * np.exp(-points[1:]), width), lower_last=True)
    add[-1] += n0_above
    mirrored = slice(len(index) - dense.stop, len(index) - dense.start)
    return {REMOVE: remove, ADD: _lattice_loss(interval, -index[::-1], add[::-1], mirrored, n0_below)}


def _lattice_loss(interval: float, index: np.ndarray, masses: np.ndarray, dense: slice, infinity_mass: float) -> LatticeLoss:
    """Point masses at ascending lattice ``index``: consecutive in ``dense``, evenly spaced on either side."""
    tails = tuple(
        Run(int(index[part][0]), int(index[part][1] - index[part][0]) if len(index[part]) > 1 else 1, masses[part])
        for part in (slice(0, dense.start), slice(dense.stop, len(index)))
        if len(index[part])
    )
    return LatticeLoss(interval, int(index[dense.start]), np.ascontiguousarray(masses[dense]), float(infinity_mass), tails)


# ----------------------------------------------------------------------------
# 3. Composition
# ----------------------------------------------------------------------------


def reduce_history(history: Sequence[Segment]) -> Optional[List[Segment]]:
    """The segments that carry privacy loss, or None if some step has none of its noise (σ = 0).

    Steps with σ = ∞ or no steps are dropped, repeated (σ, q) are merged, and all
    q = 1 segments become a single Gaussian step with 1/σ² = Σ k/σ_k² — exactly
    their composition, so it is discretised once instead of composed.
    """
    counts: Dict[Tuple[float, float], int] = {}
    gaussian_precision = 0.0
    for sigma, q, steps in history:
        if steps == 0 or math.isinf(sigma):
            continue
        if sigma == 0:
            return None
        if q == 1.0:
            gaussian_precision += steps / sigma**2
        else:
            counts[(sigma, q)] = counts.get((sigma, q), 0) + steps
    segments = [(sigma, q, steps) for (sigma, q), steps in counts.items()]
    if gaussian_precision > 0:
        segments.append((1.0 / math.sqrt(gaussian_precision), 1.0, 1))
    return segments


# Integer orders only: their RDP is a finite sum, cheap and exact for any σ, while
# fractional orders need an integral whose cost grows like 1/σ² (seconds and
# gigabytes at σ ≈ 0.01, which σ searches do reach).
WINDOW_ORDERS = np.arange(2, 65, dtype=float)


def history_rdp(segments: Sequence[Segment]) -> np.ndarray:
    """The Rényi DP of the history at WINDOW_ORDERS."""
    return sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=WINDOW_ORDERS) for sigma, q, steps in segments)


def _lattice_log_excess(s: float, interval: float, tail_mass: float, rare_mass: float, ratio: int) -> float:
    """Bound on log E[e^(s·Ŷ)] - log E[e^(s·Y)] for one discretised step Ŷ of loss Y (s ≥ 0, or s ≤ -1).

    Connect-the-dots replaces a point y in a cell of width w by the two ends with
    the same mean of e^(-y); e^(s·y) = (e^(-y))^(-s) is convex in e^(-y), and the
    chord exceeds it by a factor ≤ 1 + |s(s+1)|·w²·e^((|s|+2)w)/8. Cells of width
    ratio·w hold at most rare_mass; the lower truncation moves ≤ tail_mass up.
    """

    def gap(width: float) -> float:
        exponent = (abs(s) + 2) * width
        return math.inf if exponent > 700 else abs(s * (s + 1)) * width**2 * math.exp(exponent) / 8

    return math.log1p(gap(interval) + rare_mass * gap(ratio * interval) + (tail_mass if s > 0 else 0.0))


def _exact_log_mgf(steps: Sequence[Tuple[LatticeLoss, int]], s: float) -> float:
    """log E[e^(s·Ŝ); Ŝ finite] for the composition of the lattice steps, exactly."""
    total = 0.0
    for step, count in steps:
        values = np.concatenate([run.offsets(0) for run in step.runs()]) * step.interval
        masses = np.concatenate([run.masses for run in step.runs()])
        shift = s * (values.max() if s > 0 else values.min())  # the largest s·v: no overflow
        total += count * (shift + math.log(np.dot(masses, np.exp(s * values - shift))))
    return total


def plan_window(
    rdp: np.ndarray,
    steps: Sequence[Tuple[LatticeLoss, int]],
    *,
    tail_mass: float,
    window_error: float,
    rare_mass: float = 0.0,
    ratio: int = 1,
    delta: Optional[float] = None,
    epsilon: Optional[float] = None,
) -> Tuple[Tuple[float, float], float]:
    """A window and a tilt θ for composing the lattice ``steps``, for a query at ``delta`` or ``epsilon``.

    The composition is computed modulo the window width; what wraps around changes
    δ(ε), for every ε ≥ 0, by at most ``window_error``. The Chernoff bounds for the
    composed lattice loss Ŝ use K(s) ≥ log E[e^(sŜ)]: from the history's Rényi DP
    ``rdp`` R(α) at WINDOW_ORDERS, K(α-1) = (α-1)·R(α) and K(-α) = (α-1)·R(α), a bound
    in both directions (Mironov, Talwar, Zhang 2019: D_α(μ0‖M) ≤ D_α(M‖μ0)), plus
    ``_lattice_log_excess``; and, when the best order is the smallest (large
    spreads, ε of hundreds or more), the exact K of the lattice steps for |s| < 1.

    Untilted (θ = 0): the window [b, U] misses P[Ŝ < b] ≤ window_error/4 and
    P[Ŝ > U] ≤ window_error/2.
    Tilted: the distribution is reweighted by e^(θŜ), θ at the query's saddle
    point (the best s), which keeps the composed pmf accurate relative to δ far
    in the tail. The window starts at max(b, 0): what is below it matters for no
    ε ≥ 0 except as it wraps, damped by e^(-θW) ≤ window_error/4, while
    mass above U wraps amplified by up to e^(θ(Ŝ - b)), which with the mass
    missing above U stays ≤ 2·e^(-θb)·E[e^(θŜ); Ŝ ≥ U] ≤ window_error/2. The
    tilt is used unless its window would be much wider.
    """
    interval, orders = steps[0][0].interval, WINDOW_ORDERS
    total = sum(count for _, count in steps)

    def excess(s: float) -> float:
        return total * _lattice_log_excess(s, interval, tail_mass, rare_mass, ratio)

    s_up, k_up = orders - 1, (orders - 1) * rdp + np.array([excess(order - 1) for order in orders])
    s_low, k_low = orders, (orders - 1) * rdp + np.array([excess(-order) for order in orders])
    log_tail, log_quarter = math.log(2 / window_error), math.log(4 / window_error)

    def query_objective(s, k):  # minimised at the query's saddle point (Chernoff for δ(ε) or ε(δ))
        if delta is not None:
            return (k + math.log(1 / delta)) / s
        return k - s * epsilon if epsilon is not None else None

    window_at_edge = np.argmin((k_up + log_tail) / s_up) == 0
    query_at_edge = query_objective(s_up, k_up) is not None and np.argmin(query_objective(s_up, k_up)) == 0
    if window_at_edge or query_at_edge:  # the best s may be < 1: use the exact K there
        small = 2.0 ** (-np.arange(1, 21) / 2)
        s_up = np.concatenate((small, s_up))
        k_up = np.concatenate(([_exact_log_mgf(steps, s) for s in small], k_up))
    if window_at_edge:
        s_low = np.concatenate((small, s_low))
        k_low = np.concatenate(([_exact_log_mgf(steps, -s) for s in small], k_low))
    upper = float(np.min((k_up + log_tail) / s_up))
    lower = -min(log_quarter, float(np.min((k_low + log_quarter) / s_low)))
    untilted = ((lower, upper), 0.0)

    # The saddle point: the Chernoff-optimal s for the query. At the smallest s the
    # optimum may lie anywhere below it, and a tilt much larger than the saddle
    # point's is harmful (a smaller one is merely less useful): no tilt then.
    objective = query_objective(s_up, k_up)
    if objective is None or (delta is None and objective.min() >= 0):  # P[Ŝ ≥ ε] bound is trivial: ε is small
        return untilted
    best = int(np.argmin(objective))
    if best == int(np.argmin(s_up)):
        return untilted
    # The saddle point's tilt can need a huge window when K explodes at high orders;
    # smaller tilts keep most of the precision gain. Take the largest whose window
    # is at most twice the untilted one.
    bottom = max(lower, 0.0)  # mass below 0 matters for no ε ≥ 0: it may wrap (damped)
    for tilt in s_up[best] * 0.75 ** np.arange(16):
        above = s_up > tilt
        if not above.any():
            continue
        top = np.min((k_up[above] - tilt * bottom + log_quarter) / (s_up[above] - tilt))
        width = max(float(top) - bottom, log_quarter / tilt)
        if width <= 2 * (upper - lower):
            return (bottom, bottom + width), float(tilt)
    return untilted


def _taylor_terms(ratio: float, tolerance: float = 1e-18) -> int:
    """Terms T of e^(i·r·x), |x| ≤ 1, |r| ≤ ratio, needed for a remainder below tolerance."""
    terms, remainder = 1, ratio
    while remainder * math.exp(ratio) > tolerance:
        terms += 1
        remainder *= ratio / terms
    return terms


def _phase(integer_offset: int, bins: np.ndarray, period: int) -> np.ndarray:
    """2π·(offset·bins mod period)/period, exact in integer arithmetic before the float step."""
    offset = int(integer_offset) % period
    return (2 * np.pi / period) * ((offset * bins) % period).astype(float)


def _centered_spectrum_fft(step: LatticeLoss, n: int) -> np.ndarray:
    """Σ_c p_c e^(-2πi(c - center)l/n) for l = 0..n/2 (c counted from ``start``), by a real FFT of length n."""
    pmf = step.pmf
    if len(pmf) > n or step.tails:  # fold: the transform only sees the lattice modulo n
        positions = np.concatenate([run.offsets(step.start) for run in step.runs()]) % n
        pmf = np.bincount(positions, weights=np.concatenate([run.masses for run in step.runs()]), minlength=n)
    spectrum = sp_fft.rfft(pmf, n)
    bins = np.arange(len(spectrum), dtype=np.int64)
    return spectrum * np.exp(1j * _phase(step.center, bins, n))


def _power_sums(values: np.ndarray, x: np.ndarray, terms: int, chunk: int = 4096) -> np.ndarray:
    """Σ_c values[B, c]·x_c^r for r < terms, as (terms, blocks): matrix products with Vandermonde chunks."""
    sums = np.zeros((terms, values.shape[0]))
    for first in range(0, len(x), chunk):
        vandermonde = np.cumprod(np.broadcast_to(x[first : first + chunk, None], (len(x[first : first + chunk]), terms)), axis=1)
        vandermonde = np.hstack((np.ones((len(vandermonde), 1)), vandermonde[:, :-1]))
        sums += vandermonde.T @ values[:, first : first + chunk].T
    return sums


def _taylor_coefficients(blocks: int, bins: int, terms: int) -> np.ndarray:
    """(-iπl/blocks)^r / r! for r < terms, l = 0..bins, as (terms, bins+1)."""
    scaled = -1j * np.pi * np.arange(bins + 1) / blocks
    coefficients = np.empty((terms, bins + 1), dtype=complex)
    coefficients[0] = 1.0
    for r in range(1, terms):
        coefficients[r] = coefficients[r - 1] * scaled / r
    return coefficients


def _run_block_moments(run: Run, origin: int, block_len: int, blocks: int, terms: int) -> np.ndarray:
    """Σ over the run's points in block B of mass·x^r, r < terms, folded onto B mod blocks: (terms, blocks).

    Blocks are [B·R, (B+1)·R) counted from ``origin``, with R = block_len a multiple
    of the stride, so every block sees the run's points at the same offsets x
    (from the block centre, in units of R/2) and the sums are matrix products.
    """
    offset, stride, masses = run.first - origin, run.stride, run.masses
    phase = offset % stride  # the run's points sit at phase + stride·j within every block
    slots = block_len // stride
    first_block = offset // block_len
    first_slot = (offset - first_block * block_len - phase) // stride
    x_of_slot = lambda slot: (phase + stride * slot - (block_len - 1) / 2) / (block_len / 2)
    if first_slot + len(masses) <= slots:  # within one block: no padding to the block length
        moments = _power_sums(masses[None, :], x_of_slot(first_slot + np.arange(len(masses))), terms)
    else:
        n_blocks = -(-(first_slot + len(masses)) // slots)
        padded = np.zeros(n_blocks * slots)
        padded[first_slot : first_slot + len(masses)] = masses
        moments = _power_sums(padded.reshape(n_blocks, slots), x_of_slot(np.arange(slots)), terms)
    folded = np.zeros((terms, blocks))
    columns = (first_block + np.arange(moments.shape[1])) % blocks
    for chunk in range(0, moments.shape[1], blocks):  # distinct columns within a chunk
        folded[:, columns[chunk : chunk + blocks]] += moments[:, chunk : chunk + blocks]
    return folded


def _centered_spectrum_blocks(step: LatticeLoss, n: int, blocks: int, coefficients: np.ndarray) -> np.ndarray:
    """The same coefficients for l = 0..bins only, from block moments (n = R·blocks).

    Block B of R lattice points contributes e^(-2πi·B·l/blocks) times
    Σ_r (-iπl/blocks)^r/r! · Σ_c p_c x_c^r, with x_c ∈ (-1, 1) the point's offset
    from the block centre in units of R/2; the B-sums are real FFTs of length
    ``blocks``. Needs π·bins/blocks ≤ π/2 (see ``_taylor_terms``).
    """
    terms, n_bins = coefficients.shape
    block_len = n // blocks
    moments = sum(_run_block_moments(run, step.start, block_len, blocks, terms) for run in step.runs())
    block_sums = sp_fft.rfft(moments, blocks, axis=1)[:, :n_bins]
    spectrum = np.einsum("rl,rl->l", coefficients, block_sums)
    # Block B is centred at B·R + (R-1)/2; shift to the step's centre point.
    l = np.arange(n_bins, dtype=np.int64)
    phase = (np.pi / n) * ((((2 * step.center - (block_len - 1)) % (2 * n)) * l) % (2 * n)).astype(float)
    return spectrum * np.exp(1j * phase)


def _bandwidth(steps: Sequence[Tuple[LatticeLoss, int]], log_threshold: float) -> float:
    """A frequency ω* beyond which |Π_j ψ_j(ω)^k_j| ≤ e^log_threshold, ψ_j the steps' characteristic functions.

    Summation by parts: |ψ(ω)| ≤ TV1/|1 - e^(iωh)| and ≤ TV2/|1 - e^(iωh)|²,
    and |1 - e^(iωh)| ≥ 2ωh/π for ωh ≤ π. Returns inf if no ω ≤ π/h qualifies.
    """
    h = steps[0][0].interval
    mass, tv1, tv2, count = (np.array(column, dtype=float) for column in zip(
        *((step.mass, step.tv1, step.tv2, count) for step, count in steps)))

    def log_bound(omega: float) -> float:
        gap = 2 * omega * h / np.pi
        with np.errstate(divide="ignore"):
            return float(np.dot(count, np.log(np.minimum(mass, np.minimum(tv1 / gap, tv2 / gap**2)))))

    nyquist = np.pi / h
    if log_bound(nyquist) > log_threshold:
        return math.inf
    low, high = 0.0, nyquist
    for _ in range(60):
        mid = (low + high) / 2
        if log_bound(mid) > log_threshold:
            low = mid
        else:
            high = mid
    return high


@dataclass
class ComposedLoss:
    """The total privacy loss of a history in one direction, on a circular lattice window.

    The window holds the lattice points v_i = (start + i)·interval, i < size. The
    composition is stored tilted: p̃_i = p_i·exp(tilt·v_i - log_scale), either as
    the window pmf (``pmf``) or as its DFT coefficients F_0..F_K (``spectrum``;
    the others are negligible, see ``_bandwidth``). ``infinity_mass`` is the mass
    at +∞ plus whatever the caller chose to count pessimistically.

    δ(ε) = Σ_(v_i > ε) p_i (1 - e^(ε - v_i)) = e^(log_scale - tilt·v_a)·(T0_a - e^(ε - v_a)·T1_a)
    with a the first point above ε and Tx_a = Σ_(i≥a) p̃_i·e^(-(tilt + x)(v_i - v_a)).
    """

    interval: float
    start: int
    size: int
    infinity_mass: float
    tilt: float = 0.0
    log_scale: float = 0.0
    mean: float = 0.0  # of the (tilted) composed loss
    std: float = 0.0
    pmf: Optional[np.ndarray] = None
    spectrum: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.pmf is not None:
            from scipy.signal import lfilter  # on first use: importing scipy.signal takes 0.8 s

            reversed_pmf = self.pmf[::-1]
            decay = [math.exp(-(self.tilt + x) * self.interval) for x in (0, 1)]
            self._t0, self._t1 = (lfilter([1.0], [1.0, -d], reversed_pmf)[::-1] for d in decay)

    def _value(self, index: int) -> float:
        return (self.start + index) * self.interval

    def _untilt(self, bracket: float, a: int) -> float:
        """bracket·e^(log_scale - tilt·v_a) without overflow in the factor."""
        if bracket == 0:
            return 0.0
        exponent = math.log(abs(bracket)) + self.log_scale - self.tilt * self._value(a)
        return math.copysign(math.exp(min(exponent, 709.0)), bracket)

    def finite_delta(self, epsilon: float) -> float:
        """E[(1 - e^(ε - S))_+; S finite]."""
        a = int(min(max(math.floor(epsilon / self.interval) - self.start + 1, 0), self.size))
        if a >= self.size:
            return 0.0
        c_a = math.exp(epsilon - self._value(a))
        if self.pmf is not None:
            return self._untilt(float(self._t0[a] - c_a * self._t1[a]), a)
        return self._untilt(self._bracket_from_spectrum(a, c_a), a)

    def _bracket_from_spectrum(self, a: int, c_a: float) -> float:
        """T0_a - c_a·T1_a from F_0..F_K, with p̃_i = (1/n)Σ_l F_l z_l^i and geometric sums
        Σ_(i=a)^(n-1) z^i ρ^(i-a) = (z^a - ρ^(n-a))/(1 - zρ) (z^n = 1)."""
        n, h = self.size, self.interval
        l = np.arange(1, len(self.spectrum), dtype=np.int64)
        angle = (2 * np.pi / n) * l
        z_a = np.exp(1j * _phase(a, l, n))
        sin_half_sq, sin = np.sin(angle / 2) ** 2, np.sin(angle)
        total = 0.0
        for weight, rate in ((1.0, self.tilt), (-c_a, self.tilt + 1)):
            rho = math.exp(-rate * h)
            one_minus_rho = -math.expm1(-rate * h)
            rho_tail = math.exp(-rate * h * (n - a))
            head = (n - a) if rate == 0 else (1 - rho_tail) / one_minus_rho
            series = (z_a - rho_tail) / ((one_minus_rho + 2 * rho * sin_half_sq) - 1j * rho * sin)
            total += weight * (self.spectrum[0].real * head + 2 * np.real(np.dot(self.spectrum[1:], series)))
        return total / n

    def delta(self, epsilon: float) -> float:
        return min(1.0, self.finite_delta(epsilon) + self.infinity_mass)

    def epsilon(self, delta: float) -> float:
        """The smallest ε ≥ 0 with δ(ε) ≤ delta (inf if the mass at +∞ alone exceeds it)."""
        target = delta - self.infinity_mass
        if target <= 0:
            return math.inf
        if self.pmf is not None:
            return max(0.0, self._epsilon_from_pmf(target))
        return self._epsilon_by_search(target)

    def _epsilon_from_pmf(self, target: float) -> float:
        # δ at ε = v_i (a = i + 1) for every i at once; the last point where it exceeds the
        # target bounds the cell, on which δ is linear in e^ε.
        h, n = self.interval, self.size
        values = self._value(np.arange(1, n))
        with np.errstate(divide="ignore", invalid="ignore"):
            log_delta_at = np.log(self._t0[1:] - math.exp(-h) * self._t1[1:]) + self.log_scale - self.tilt * values
        above = np.flatnonzero(log_delta_at > math.log(target))
        a = int(above[-1]) + 1 if len(above) else 0
        scaled_target = math.exp(math.log(target) - self.log_scale + self.tilt * self._value(a))
        ratio = (self._t0[a] - scaled_target) / self._t1[a]
        return self._value(a) + math.log(ratio) if ratio > 0 else -math.inf

    def _epsilon_by_search(self, target: float) -> float:
        # δ is accurate near the tilted loss's mean (the saddle point of the query) and
        # loses relative precision many standard deviations below it, so bracket the
        # root by short steps out from the mean, then refine.
        bottom, top = max(0.0, self._value(0)), self._value(self.size - 1)
        step = max(self.std / 2, (top - bottom) / 1024, self.interval)
        point = min(max(self.mean, bottom), top)
        if self.finite_delta(point) > target:
            low, high = point, min(point + step, top)
            while self.finite_delta(high) > target:
                low, high = high, min(high + step, top)
        else:
            high, low = point, max(point - step, bottom)
            while self.finite_delta(low) <= target:
                if low == bottom:
                    return bottom
                high, low = low, max(low - step, bottom)
        return float(optimize.brentq(lambda e: self.finite_delta(e) - target, low, high, xtol=1e-13, rtol=1e-14))


# Coefficients whose bound is below this (times 1/size) are dropped: the error in δ
# is then below size·threshold ≤ 1e-30.
_LOG_SPECTRUM_THRESHOLD = math.log(1e-30)
_MAX_FFT_SIZE = 2**23  # lattice points composed by full FFTs (memory ~ 8 arrays of this many doubles)
_MAX_WINDOW = 2**40  # with _MAX_BINS, keeps the phase arithmetic within int64
_MAX_BINS = 2**21
MAX_STEP_POINTS = 2**22  # lattice points of one step's distribution
MAX_COARSENINGS = 40


class LatticeTooFine(ValueError):
    """The lattice would need more points than memory allows; retry with a coarser one."""


def _tilted(step: LatticeLoss, tilt: float) -> Tuple[LatticeLoss, float]:
    """The step's finite part reweighted by e^(tilt·v) and normalised, and log Σ p·e^(tilt·v)."""
    h = step.interval
    logs = [(tilt * h) * (run.offsets(step.start) - step.center) for run in step.runs()]
    shift = max(float(log[-1]) for log in logs)  # the largest weight is 1: no overflow
    weighted = [run.masses * np.exp(log - shift) for run, log in zip(step.runs(), logs)]
    total = sum(float(w.sum()) for w in weighted)
    tails = tuple(Run(run.first, run.stride, w / total) for run, w in zip(step.tails, weighted[1:]))
    tilted = LatticeLoss(h, step.start, weighted[0] / total, 0.0, tails)
    return tilted, tilt * h * (step.start + step.center) + shift + math.log(total)


def _single_step(step: LatticeLoss, infinity_mass: float) -> ComposedLoss:
    """One step as a ComposedLoss: its own pmf on its own support (tails filled in)."""
    offsets = [run.offsets(step.start) for run in step.runs()]
    low = min(int(o.min()) for o in offsets)
    pmf = np.zeros(max(int(o.max()) for o in offsets) - low + 1)
    for o, run in zip(offsets, step.runs()):
        pmf[o - low] = run.masses
    h = step.interval
    mean, std = h * (step.start + step.mean), h * math.sqrt(step.variance)
    return ComposedLoss(h, step.start + low, len(pmf), infinity_mass, mean=mean, std=std, pmf=pmf)


def compose(
    steps: Sequence[Tuple[LatticeLoss, int]],
    window: Tuple[float, float],
    extra_infinity_mass: float = 0.0,
    tilt: float = 0.0,
) -> ComposedLoss:
    """Compose ``count`` copies of each lattice loss, modulo a window covering [lower, upper].

    With ``tilt`` θ > 0 the composition is of the tilted steps (see ComposedLoss).
    Mass outside the window wraps around; the caller bounds its effect (and adds
    that bound to ``extra_infinity_mass`` if it wants it counted).
    """
    h = steps[0][0].interval
    log_finite = sum(count * math.log1p(-step.infinity_mass) for step, count in steps)
    infinity_mass = min(1.0, -math.expm1(log_finite) + extra_infinity_mass)
    if len(steps) == 1 and steps[0][1] == 1:  # nothing to compose (e.g. a history with q = 1 only)
        return _single_step(steps[0][0], infinity_mass)
    lower, upper = window
    start = math.floor(lower / h) - 1
    needed = math.ceil(upper / h) + 1 - start + 1
    if needed > _MAX_WINDOW:
        raise LatticeTooFine("window too wide for this lattice")
    log_scale = 0.0
    if tilt > 0:
        tilted = [(_tilted(step, tilt), count) for step, count in steps]
        steps = [(step, count) for (step, _), count in tilted]
        log_scale = sum(count * log_mgf for (_, log_mgf), count in tilted)
    offset = sum(count * (step.start + step.center) for step, count in steps) - start

    omega = _bandwidth(steps, _LOG_SPECTRUM_THRESHOLD - math.log(2 * needed))
    bins = math.ceil(omega * needed * h / (2 * np.pi)) if math.isfinite(omega) else needed
    if 32 * (bins + 1) <= needed:
        blocks = sp_fft.next_fast_len(2 * (bins + 1), real=True)
        stride = math.lcm(*(run.stride for step, _ in steps for run in step.runs()))
        size = blocks * stride * -(-needed // (blocks * stride))  # blocks hold whole strides
        bins = min(math.ceil(omega * size * h / (2 * np.pi)), blocks // 2)
        if bins > _MAX_BINS:
            raise LatticeTooFine("too many Fourier coefficients")
        coefficients = _taylor_coefficients(blocks, bins, _taylor_terms(np.pi * bins / blocks))

        def spectrum_of(step):
            return _centered_spectrum_blocks(step, size, blocks, coefficients)

    else:
        if needed > _MAX_FFT_SIZE:
            raise LatticeTooFine("lattice too fine for a full FFT")
        size = sp_fft.next_fast_len(needed, real=True)
        bins = size // 2

        def spectrum_of(step):
            return _centered_spectrum_fft(step, size)

    # The product of the steps' spectra, as Σ count·log|ψ| and Σ count·arg ψ (the
    # steps are centred, so the arguments stay small where |ψ| matters).
    l = np.arange(bins + 1, dtype=np.int64)
    log_magnitude = np.zeros(bins + 1)
    angle = -_phase(offset, l, size)
    with np.errstate(divide="ignore"):
        for step, count in steps:
            spectrum = spectrum_of(step)
            log_magnitude += count * np.log(np.abs(spectrum))
            angle += count * np.angle(spectrum)
    composed = np.zeros(bins + 1, dtype=complex)
    alive = log_magnitude > -745
    composed[alive] = np.exp(log_magnitude[alive] + 1j * angle[alive])
    mean = h * sum(count * (step.start + step.mean) for step, count in steps)
    std = h * math.sqrt(sum(count * step.variance for step, count in steps))
    layout = dict(interval=h, start=start, size=size, infinity_mass=infinity_mass, tilt=tilt, log_scale=log_scale)
    layout.update(mean=mean, std=std)
    if bins == size // 2:
        return ComposedLoss(**layout, pmf=sp_fft.irfft(composed, size))
    return ComposedLoss(**layout, spectrum=composed)


def compose_directions(
    segments: Sequence[Segment],
    *,
    interval: float,
    tail_mass: float,
    window_error: float,
    fallback: str,
    extra_infinity_mass: float = 0.0,
    rare_mass: float = 0.0,
    ratio: int = 1,
    delta: Optional[float] = None,
    epsilon: Optional[float] = None,
) -> Tuple[Dict[str, ComposedLoss], float]:
    """The history composed in both directions, and the lattice interval actually used.

    Every segment is discretised once (see ``discretize_step``); window and tilt
    are planned for a query at ``delta`` or ``epsilon`` (see ``plan_window``), so
    that what wraps around the window moves δ by ≤ ``window_error``. The interval
    is coarsened only where memory requires it (``fit_interval``, then doubling);
    if even that fails, the ValueError names the ``fallback`` accountant.
    """
    interval = fit_interval(segments, interval, tail_mass, rare_mass, ratio)
    for _ in range(MAX_COARSENINGS):
        try:
            return _compose_directions(segments, interval, tail_mass, window_error, extra_infinity_mass,
                                       rare_mass, ratio, delta, epsilon), interval
        except LatticeTooFine:
            interval *= 2
    raise ValueError(f"the privacy loss of this history does not fit in memory on any lattice; use {fallback}")


def _compose_directions(segments, interval, tail_mass, window_error, extra_infinity_mass, rare_mass, ratio, delta, epsilon):
    if any(step_points(sigma, q, interval, tail_mass, rare_mass, ratio) > MAX_STEP_POINTS for sigma, q, _ in segments):
        raise LatticeTooFine("one step needs too many lattice points")
    lattice = dict(interval=interval, tail_mass=tail_mass, rare_mass=rare_mass, ratio=ratio)
    steps = [(discretize_step(sigma, q, **lattice), count) for sigma, q, count in segments]
    single_step = len(segments) == 1 and segments[0][2] == 1  # nothing to compose, no window needed
    rdp = None if single_step else history_rdp(segments)
    composed = {}
    for direction in DIRECTIONS:
        direction_steps = [(step[direction], count) for step, count in steps]
        window, tilt = ((0.0, 0.0), 0.0) if single_step else plan_window(
            rdp, direction_steps, tail_mass=tail_mass, window_error=window_error, rare_mass=rare_mass,
            ratio=ratio, delta=delta, epsilon=epsilon,
        )
        composed[direction] = compose(direction_steps, window, extra_infinity_mass, tilt)
    return composed
