"""Name → accountant class, so engines and the CLI can pick one by string."""

from __future__ import annotations

from typing import Dict, Type

from .accountant import IAccountant

_ACCOUNTANTS: Dict[str, Type[IAccountant]] = {}


def register_accountant(mechanism: str, accountant: Type[IAccountant], force: bool = False) -> None:
    """Make ``create_accountant(mechanism)`` return an instance of ``accountant``.

    A name already registered (the built-in "rdp", "prv", "pld", "gdp" included) is refused unless
    ``force=True``, so that no import can silently replace an accountant (Opacus semantics)."""
    if not (isinstance(accountant, type) and issubclass(accountant, IAccountant)):
        raise ValueError(f"accountant must be a subclass of fastdp.accountants.IAccountant, got {accountant!r}")
    if mechanism in _ACCOUNTANTS and not force and _ACCOUNTANTS[mechanism] is not accountant:
        raise ValueError(
            f"an accountant is already registered for {mechanism!r} ({_ACCOUNTANTS[mechanism].__name__}); "
            "pass force=True to replace it"
        )
    _ACCOUNTANTS[mechanism] = accountant


def available_accountants():
    """The names ``create_accountant`` accepts, sorted (the built-in "gdp", "pld", "prv", "rdp" and any registered)."""
    return sorted(_ACCOUNTANTS)


def create_accountant(mechanism: str) -> IAccountant:
    """A new accountant by name: one of ``available_accountants()``."""
    try:
        return _ACCOUNTANTS[mechanism]()
    except KeyError:
        raise ValueError(
            f"accountant must be one of {available_accountants()}, got {mechanism!r} "
            "(register your own with fastdp.accountants.register_accountant)"
        ) from None
