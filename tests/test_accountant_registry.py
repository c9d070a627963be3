"""Accountant registry and state: no silent replacement of an accountant, no malformed state loaded."""

import pytest

from fastdp.accountants import GaussianAccountant, IAccountant, RDPAccountant, create_accountant, register_accountant
from fastdp.accountants import registry


class _Dummy(IAccountant):
    @classmethod
    def mechanism(cls):
        return "dummy-19"

    def get_epsilon(self, delta):
        return 0.0


class _Dummy2(_Dummy):
    pass


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    registry._ACCOUNTANTS.pop("dummy-19", None)


def test_a_built_in_cannot_be_replaced_without_force():
    with pytest.raises(ValueError, match="force=True"):
        register_accountant("rdp", _Dummy)
    assert type(create_accountant("rdp")) is RDPAccountant


def test_force_replaces_and_re_registering_the_same_class_is_fine():
    register_accountant("dummy-19", _Dummy)
    register_accountant("dummy-19", _Dummy)
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("dummy-19", _Dummy2)
    register_accountant("dummy-19", _Dummy2, force=True)
    assert type(create_accountant("dummy-19")) is _Dummy2


@pytest.mark.parametrize("state", [None, {}, {"1": 2}, {"history": []}, {"mechanism": "rdp"}, [("history", [])]])
def test_malformed_state_is_refused(state):
    with pytest.raises(ValueError, match="history"):
        RDPAccountant().load_state_dict(state)


def test_state_of_another_mechanism_is_refused_with_the_fix():
    rdp = RDPAccountant()
    rdp.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="accountant='rdp'"):
        GaussianAccountant().load_state_dict(rdp.state_dict())
    restored = RDPAccountant()
    restored.load_state_dict(rdp.state_dict())
    assert restored.history == rdp.history
