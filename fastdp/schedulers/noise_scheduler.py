"""Noise-multiplier schedulers (Opacus's ``opacus.schedulers.noise_scheduler``)."""

from __future__ import annotations

from typing import Callable

from ..accountants.validation import check_noise_multiplier
from .base import _DPOptimizerScheduler


class _NoiseScheduler(_DPOptimizerScheduler):
    """Base class: sets ``optimizer.noise_multiplier`` to ``get_noise_multiplier()`` at each ``step()``."""

    attribute = "noise_multiplier"

    def get_noise_multiplier(self) -> float:
        raise NotImplementedError

    def get_value(self) -> float:
        return check_noise_multiplier(self.get_noise_multiplier())


class ExponentialNoise(_NoiseScheduler):
    """σ ← σ·gamma at every step after the first (the factors accumulate)."""

    def __init__(self, optimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        return self._exponential(self.gamma)


class LambdaNoise(_NoiseScheduler):
    """σ = σ₀ · noise_lambda(epoch), σ₀ the optimizer's σ when the scheduler was built (no accumulation)."""

    def __init__(self, optimizer, *, noise_lambda: Callable[[int], float], last_epoch: int = -1):
        self.noise_lambda = noise_lambda
        self.base_noise_multiplier = optimizer.noise_multiplier
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        return self.base_noise_multiplier * self.noise_lambda(self.last_epoch)


class StepNoise(_NoiseScheduler):
    """σ ← σ·gamma every ``step_size`` steps (the factors accumulate)."""

    def __init__(self, optimizer, *, step_size: int, gamma: float, last_epoch: int = -1):
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_noise_multiplier(self) -> float:
        return self._stepped(self.step_size, self.gamma)
