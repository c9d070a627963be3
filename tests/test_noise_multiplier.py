"""get_noise_multiplier never returns a σ whose ε exceeds the target."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastdp.accountants import IAccountant, create_accountant, get_noise_multiplier, register_accountant
from fastdp.accountants import utils


def _epsilon(accountant, sigma, q, steps, delta):
    acc = create_accountant(accountant)
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant, examples", [("rdp", 40), ("gdp", 40), ("prv", 6), ("pld", 6)])
def test_sigma_never_overshoots_the_budget(accountant, examples):
    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        target=st.floats(0.3, 30.0),
        q=st.floats(1e-4, 1.0),
        steps=st.integers(1, 5000),
        delta=st.sampled_from([1e-3, 1e-5, 1e-8]),
    )
    def check(target, q, steps, delta):
        sigma = get_noise_multiplier(
            target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant=accountant
        )
        eps = _epsilon(accountant, sigma, q, steps, delta)
        assert eps <= target
        assert (  # and it is the smallest such σ, to the search's resolution
            eps >= target - 0.01
            or sigma <= 2 * utils.SIGMA_RESOLUTION
            or _epsilon(accountant, sigma * 0.99, q, steps, delta) > target - 0.01
        )

    check()


def test_importable_from_utils_module():
    assert utils.get_noise_multiplier is get_noise_multiplier


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": float("nan")}, "target_epsilon"),
        ({"target_delta": 1.0}, "target_delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"epochs": None, "steps": -3}, "steps"),
        ({"epochs": None}, "epochs= or steps="),
        ({"steps": 10}, "epochs= or steps="),
        ({"epochs": -1}, "epochs"),
        ({"epsilon_tolerance": 0}, "epsilon_tolerance"),
        ({"accountant": "nope"}, "accountant"),
    ],
)
def test_bad_arguments(kwargs, argument):
    args = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, epochs=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        get_noise_multiplier(**args)


def test_flat_epsilon_terminates():
    """ε can be flat in σ (PLD: exactly 0 for one step with δ ≥ q): the search must still stop."""

    class ZeroLoss(IAccountant):
        @classmethod
        def mechanism(cls):
            return "zero-loss"

        def get_epsilon(self, delta):
            return 0.0

    register_accountant("zero-loss", ZeroLoss)
    sigma = get_noise_multiplier(target_epsilon=0.3, target_delta=1e-3, sample_rate=1e-4, steps=1, accountant="zero-loss")
    assert 0 < sigma <= 2 * utils.SIGMA_RESOLUTION


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="not reachable"):
        get_noise_multiplier(target_epsilon=1e-9, target_delta=1e-9, sample_rate=1.0, steps=10**9, accountant="gdp")
