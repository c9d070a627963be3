"""Name → accountant class, so engines and the CLI can pick one by string."""

from __future__ import annotations

from typing import Dict, Type

from .accountant import IAccountant

_ACCOUNTANTS: Dict[str, Type[IAccountant]] = {}


def register_accountant(name: str, cls: Type[IAccountant]) -> None:
    """Make ``create_accountant(name)`` return an instance of ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, IAccountant)):
        raise ValueError(f"cls must be a subclass of fastdp.accountants.IAccountant, got {cls!r}")
    _ACCOUNTANTS[name] = cls


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
