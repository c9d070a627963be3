"""The ε lower bound of one-run auditing (Steinke, Nasr, Jagielski 2023).

"Privacy auditing with one (1) training run" (NeurIPS 2023, arXiv:2305.08846). m canaries are
each included independently with probability ½; after training, the auditor guesses "in" or
"out" for r of them (abstaining on the rest) and v guesses are right. The paper's main theorem
(the (ε, δ) form; its Appendix D gives the computation implemented here) says that if training
is (ε, δ)-DP then, with q = e^ε / (1 + e^ε) (the accuracy of ε-DP randomised response),

    P[W ≥ v] ≤ P[Binomial(r, q) ≥ v] + 2·m·δ · max_{1 ≤ i ≤ v} (1/i)·P[v - i ≤ Binomial(r, q) < v].

That right-hand side is the p-value of the hypothesis "training is (ε, δ)-DP". The audit reports
the largest ε it rejects at significance 1 - confidence: ε_lower. Any ε whose p-value is below
the significance is a valid rejection (if training is (ε*, δ)-DP it is (ε, δ)-DP for every
ε ≥ ε*, and the smallest count that rejects any of those is itself a test of one of them), so
the bisection below needs no monotonicity; it only keeps its lower end rejected.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import numpy as np
from scipy.special import expit
from scipy.stats import binom


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if not v <= r <= m:
        raise ValueError(f"need correct guesses v <= guesses r <= canaries m, got v={v}, r={r}, m={m}")


def _check_probability(value: float, name: str, *, closed_low: bool) -> float:
    value = float(value)
    if not ((0 <= value if closed_low else 0 < value) and value < 1):
        raise ValueError(f"{name} must be in {'[0' if closed_low else '(0'}, 1), got {value!r}")
    return value


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] if training is (ε, δ)-DP (m canaries)."""
    _check_counts(m, r, v)
    delta = _check_probability(delta, "delta", closed_low=True)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    q = float(expit(epsilon))
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    below = np.cumsum(binom.pmf(v - i, r, q))  # P[v - i <= Binomial(r, q) < v], i = 1..v
    alpha = float(np.max(below / i))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95,
                        tolerance: float = 1e-6) -> float:
    """Largest ε (to ``tolerance``) such that "(ε, δ)-DP" is rejected at level 1 - confidence by
    v correct guesses out of r on m canaries; 0 when even ε = 0 is not rejected.

    The returned value is always one whose p-value is below 1 - confidence, so rounding only
    ever makes it smaller (conservative)."""
    _check_counts(m, r, v)
    significance = 1 - _check_probability(confidence, "confidence", closed_low=False)
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:  # bracket: p -> 1 as ε -> inf when v <= r
        low, high = high, 2 * high
        if high > 1e4:
            raise RuntimeError(f"p_value(m={m}, r={r}, v={v}) stays below {significance} up to ε={low}")
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def guess_counts(m: int, fractions: Iterable[float]) -> Tuple[int, ...]:
    """Numbers of guesses r = round(f·m), distinct and >= 1, fixed before the scores are seen."""
    counts = sorted({max(1, min(m, round(f * m))) for f in fractions})
    return tuple(counts)


def guesses_from_scores(scores: Sequence[float], r: int) -> np.ndarray:
    """Guess "in" (+1) for the ⌈r/2⌉ highest scores and "out" (-1) for the ⌊r/2⌋ lowest; abstain
    (0) on the rest. A function of the scores alone (post-processing of the trained model)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=np.int64)
    top, bottom = (r + 1) // 2, r // 2
    if top:
        guesses[order[len(scores) - top:]] = 1
    if bottom:
        guesses[order[:bottom]] = -1
    return guesses


def audit_from_scores(scores: Sequence[float], included: Sequence[bool], *, delta: float,
                      confidence: float = 0.95, fractions: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.5)):
    """ε_lower from canary scores (higher = more likely included) and the true inclusions.

    One guess count per fraction of m, chosen before looking at the scores; each is tested at
    significance (1 - confidence) / (number of counts) (Bonferroni), so the maximum over them
    holds at ``confidence``. Returns (ε_lower, r, v) of the best count."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must be 1-d of one length, got {scores.shape} and {included.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a NaN score cannot be ranked)")
    m = len(scores)
    counts = guess_counts(m, fractions)
    per_test = 1 - (1 - _check_probability(confidence, "confidence", closed_low=False)) / len(counts)
    truth = np.where(included, 1, -1)
    results = []
    for r in counts:
        v = int(np.sum(guesses_from_scores(scores, r) == truth))
        results.append((epsilon_lower_bound(m, r, v, delta=delta, confidence=per_test), r, v))
    return max(results, key=lambda result: result[:2])  # of equal bounds, the most guesses
