"""Argument checks shared by every accountant.

A privacy accountant that silently accepts a NaN or a negative noise multiplier
returns a meaningless ε, so every public entry point validates its inputs and
raises a one-line ``ValueError`` that names the offending argument.
"""

from __future__ import annotations

import math
import numbers


def _as_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_noise_multiplier(value, name: str = "noise_multiplier") -> float:
    """σ ≥ 0 (σ = 0 means no noise: ε is infinite; σ = inf means no privacy loss)."""
    value = _as_real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_sample_rate(value, name: str = "sample_rate") -> float:
    """q in (0, 1]: the Poisson inclusion probability of one example."""
    value = _as_real(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def check_delta(value, name: str = "delta") -> float:
    """δ in (0, 1)."""
    value = _as_real(value, name)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def check_epsilon(value, name: str = "target_epsilon") -> float:
    """ε > 0 and finite."""
    value = _as_real(value, name)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_steps(value, name: str = "steps") -> int:
    """A whole number of steps ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if isinstance(value, float) and (math.isnan(value) or not value.is_integer()):
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_history(history) -> list:
    """A history is a list of (noise_multiplier, sample_rate, num_steps) triples."""
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of (noise_multiplier, sample_rate, num_steps), got {history!r}")
    checked = []
    for entry in history:
        try:
            sigma, q, steps = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"history entries must be (noise_multiplier, sample_rate, num_steps), got {entry!r}"
            ) from None
        checked.append(
            (check_noise_multiplier(sigma), check_sample_rate(q), check_steps(steps, "num_steps"))
        )
    return checked
