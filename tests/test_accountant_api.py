"""The Opacus-compatible accountant interface, identical for every registered accountant."""

import math
import pickle

import pytest

from fastdp.accountants import IAccountant, available_accountants, create_accountant, register_accountant

NAMES = ["rdp", "gdp", "prv", "pld"]


def test_all_four_are_registered():
    assert set(NAMES) <= set(available_accountants())


@pytest.mark.parametrize("name", NAMES)
def test_history_step_len_and_mechanism(name):
    acc = create_accountant(name)
    assert acc.mechanism() == name and len(acc) == 0 and acc.get_epsilon(1e-5) == 0.0
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.step(noise_multiplier=2.0, sample_rate=0.01)
    assert acc.history == [(1.0, 0.01, 3), (2.0, 0.01, 1)]
    assert len(acc) == 2  # Opacus semantics: segments, not steps
    assert 0 < acc.get_epsilon(1e-5) < math.inf


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    acc = create_accountant(name)
    acc.history = [(1.1, 0.02, 50), (0.9, 0.01, 7)]
    state = pickle.loads(pickle.dumps(acc.state_dict()))
    assert state["mechanism"] == name
    restored = create_accountant(name)
    restored.load_state_dict(state)
    assert restored.history == acc.history
    assert restored.get_epsilon(1e-6) == acc.get_epsilon(1e-6)
    acc.history[0] = (5.0, 0.5, 1)
    assert restored.history[0] == (1.1, 0.02, 50)  # a copy, not a view
    with pytest.raises(ValueError, match="history"):
        restored.load_state_dict({"mechanism": name})
    for history in (None, "garbage", 3, [(1.0, 0.01)]):  # each a one-line ValueError naming the history
        with pytest.raises(ValueError, match="history|noise_multiplier"):
            restored.load_state_dict({"mechanism": name, "history": history})


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_hook_counts_virtual_steps(name):
    class FakeOptimizer:
        noise_multiplier = 1.3
        accumulated_iterations = 4

    acc = create_accountant(name)
    hook = acc.get_optimizer_hook_fn(sample_rate=0.01)
    hook(FakeOptimizer())
    hook(FakeOptimizer())
    assert acc.history == [(1.3, 0.04, 2)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"noise_multiplier": -0.1, "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": math.nan, "sample_rate": 0.1}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": math.nan}, "sample_rate"),
    ],
)
def test_bad_step_arguments(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        create_accountant(name).step(**kwargs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta(name, delta):
    acc = create_accountant(name)
    acc.history = [(1.0, 0.01, 10)]
    with pytest.raises(ValueError, match="delta"):
        acc.get_epsilon(delta)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "entry, argument",
    [((1.0, 0.01, -1), "num_steps"), ((1.0, 0.01, 2.5), "num_steps"), ((math.nan, 0.01, 1), "noise_multiplier"),
     ((1.0, 2.0, 1), "sample_rate"), ((1.0, 0.01), "history")],
)
def test_bad_history(name, entry, argument):
    acc = create_accountant(name)
    acc.history = [entry]
    with pytest.raises(ValueError, match=argument):
        acc.get_epsilon(1e-5)


def test_registry_errors_and_custom_accountant():
    with pytest.raises(ValueError, match="accountant must be one of"):
        create_accountant("moments")
    with pytest.raises(ValueError, match="subclass"):
        register_accountant("bad", object)

    class Pessimist(IAccountant):
        @classmethod
        def mechanism(cls):
            return "pessimist"

        def get_epsilon(self, delta):
            return math.inf if self.history else 0.0

    register_accountant("pessimist", Pessimist)
    acc = create_accountant("pessimist")
    acc.step(noise_multiplier=1.0, sample_rate=0.5)
    assert acc.get_epsilon(1e-5) == math.inf
