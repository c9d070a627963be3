"""The one-run audit bound (fastdp/audit/bound.py) against the paper's printed values, closed
forms, direct binomial sums, and its exact validity on randomised response."""

import math

import numpy as np
import pytest
from scipy.special import logit

from fastdp.audit.bound import (
    audit_from_scores,
    epsilon_lower_bound,
    guess_counts,
    guesses_from_scores,
    p_value,
)


def _binomial_pmf(k, n, q):
    return math.comb(n, k) * q**k * (1 - q) ** (n - k)


def _p_value_by_hand(m, r, v, epsilon, delta):
    """The theorem's right-hand side with explicit sums (no scipy, no vectorisation)."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    tail = sum(_binomial_pmf(k, r, q) for k in range(v, r + 1))
    alpha = max((sum(_binomial_pmf(k, r, q) for k in range(v - i, v)) / i for i in range(1, v + 1)), default=0.0)
    return min(tail + 2 * m * delta * alpha, 1.0)


def test_reproduces_the_papers_printed_values():
    # arXiv:2305.08846v1: the worked example of Appendix D (m=1000, r=100, v=75, δ=1e-4, 95%) prints
    # 0.673; the CIFAR-10 white-box result of §7 (m=1e5, r=1510, v=1439, δ=1e-5) prints 2.675 (truncated)
    assert epsilon_lower_bound(1000, 100, 75, delta=1e-4, confidence=0.95) == pytest.approx(0.673, abs=1e-3)
    assert epsilon_lower_bound(100000, 1510, 1439, delta=1e-5, confidence=0.95) == pytest.approx(2.6755, abs=1e-3)


@pytest.mark.parametrize("m,r,v,epsilon,delta", [
    (100, 20, 15, 0.5, 0.0), (100, 20, 15, 0.5, 1e-3), (1000, 60, 50, 1.3, 1e-5), (50, 50, 40, 2.0, 1e-2),
    (10, 7, 0, 1.0, 1e-2), (10, 7, 7, 0.0, 0.1),
])
def test_p_value_is_the_direct_binomial_computation(m, r, v, epsilon, delta):
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(_p_value_by_hand(m, r, v, epsilon, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_all_correct_pure_dp_has_a_closed_form(r, confidence):
    # δ = 0, v = r: p(ε) = q^r with q = e^ε/(1+e^ε), so ε_lower solves q^r = 1 - confidence
    expected = logit((1 - confidence) ** (1 / r))
    assert epsilon_lower_bound(r, r, r, delta=0.0, confidence=confidence) == pytest.approx(max(expected, 0), abs=1e-5)


@pytest.mark.parametrize("epsilon_true", [0.0, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("r", [20, 200])
def test_exact_validity_and_tightness_on_randomised_response(epsilon_true, r):
    """ε-DP randomised response makes each guess right with probability e^ε/(1+e^ε): the worst case
    of the theorem with δ = 0. The chance that the audit claims more than ε must be <= 5%; and the
    count one below the first overclaiming one already has chance > 5% (the bound is not loose)."""
    q = math.exp(epsilon_true) / (1 + math.exp(epsilon_true))
    overclaims = [v for v in range(r + 1) if epsilon_lower_bound(r, r, v, delta=0.0) > epsilon_true]
    if not overclaims:
        return
    first = overclaims[0]
    assert overclaims == list(range(first, r + 1))
    chance = sum(_binomial_pmf(k, r, q) for k in range(first, r + 1))
    assert chance <= 0.05
    assert chance + _binomial_pmf(first - 1, r, q) > 0.05 - 1e-4


def test_monotone_in_correct_guesses_delta_and_confidence():
    by_v = [epsilon_lower_bound(1000, 200, v, delta=1e-5) for v in range(100, 201, 5)]
    assert by_v == sorted(by_v) and by_v[0] == 0.0 and by_v[-1] > 3
    by_delta = [epsilon_lower_bound(1000, 200, 180, delta=d) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1]
    by_confidence = [epsilon_lower_bound(1000, 200, 180, delta=1e-5, confidence=c) for c in (0.5, 0.9, 0.95, 0.999)]
    assert by_confidence == sorted(by_confidence, reverse=True) and by_confidence[0] > by_confidence[-1]
    p = [p_value(1000, 200, 150, e, 1e-5) for e in np.linspace(0, 4, 41)]
    assert p == sorted(p)


@pytest.mark.parametrize("r", [2, 10, 100, 1000])
def test_chance_level_guesses_give_zero(r):
    assert epsilon_lower_bound(r, r, r // 2, delta=1e-5) == 0.0
    assert epsilon_lower_bound(r, r, 0, delta=1e-5) == 0.0


def test_guesses_take_top_and_bottom_scores():
    scores = np.array([0.5, 3.0, -2.0, 1.0, -1.0, 2.0])
    assert guesses_from_scores(scores, 5).tolist() == [0, 1, -1, 1, -1, 1]
    assert guesses_from_scores(scores, 1).tolist() == [0, 1, 0, 0, 0, 0]
    assert guess_counts(1000, (0.02, 0.5, 0.5, 2.0)) == (20, 500, 1000)


def test_audit_from_scores_is_bonferroni_corrected_best_count():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    separated = included + 0.01 * rng.random(1000)  # every guess right
    epsilon, r, v = audit_from_scores(separated, included, delta=1e-5, fractions=(0.1, 0.5))
    assert (r, v) == (500, 500)
    assert epsilon == pytest.approx(epsilon_lower_bound(1000, 500, 500, delta=1e-5, confidence=1 - 0.05 / 2))
    assert epsilon < epsilon_lower_bound(1000, 500, 500, delta=1e-5, confidence=0.95)


def test_scores_unrelated_to_inclusion_rarely_give_a_bound():
    rng = np.random.default_rng(1)
    bounds = [audit_from_scores(rng.normal(size=500), rng.random(500) < 0.5, delta=1e-5)[0] for _ in range(40)]
    assert sum(b > 0 for b in bounds) <= 6  # at most 5% in expectation; 6 of 40 has chance < 1%
    assert max(bounds) < 0.5


@pytest.mark.parametrize("call,match", [
    (lambda: p_value(10, 5, 6, 1.0, 1e-5), "v <= guesses r"),
    (lambda: p_value(10, 11, 6, 1.0, 1e-5), "r <= canaries m"),
    (lambda: p_value(10, 5, 2, -1.0, 1e-5), "epsilon"),
    (lambda: p_value(10, 5, 2, 1.0, 1.5), "delta"),
    (lambda: epsilon_lower_bound(10, 5, 2, delta=1e-5, confidence=1.0), "confidence"),
    (lambda: epsilon_lower_bound(10, 5, 2.5, delta=1e-5), "v must be a whole number"),
    (lambda: audit_from_scores([0.0, float("nan")], [True, False], delta=1e-5), "finite"),
    (lambda: audit_from_scores([0.0, 1.0], [True], delta=1e-5), "one length"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
