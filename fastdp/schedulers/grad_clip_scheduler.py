"""Clipping-bound schedulers (Opacus's ``opacus.schedulers.grad_clip_scheduler``).

The bound C sets the noise std σ·C, so changing it changes no privacy accounting (σ does); a
per-layer optimizer has one bound per parameter and refuses a single new value.
"""

from __future__ import annotations

from typing import Callable

from .base import _DPOptimizerScheduler


class _GradClipScheduler(_DPOptimizerScheduler):
    """Base class: sets ``optimizer.max_grad_norm`` to ``get_max_grad_norm()`` at each ``step()``."""

    attribute = "max_grad_norm"

    def get_max_grad_norm(self) -> float:
        raise NotImplementedError

    def get_value(self) -> float:
        return self.get_max_grad_norm()


class ExponentialGradClip(_GradClipScheduler):
    """C ← C·gamma at every step after the first (the factors accumulate)."""

    def __init__(self, optimizer, *, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        return self._exponential(self.gamma)


class LambdaGradClip(_GradClipScheduler):
    """C = C₀ · scheduler_function(epoch), C₀ the bound when the scheduler was built (no accumulation)."""

    def __init__(self, optimizer, *, scheduler_function: Callable[[int], float], last_epoch: int = -1):
        self.scheduler_function = scheduler_function
        self.base_max_grad_norm = optimizer.max_grad_norm
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        return self.base_max_grad_norm * self.scheduler_function(self.last_epoch)


class StepGradClip(_GradClipScheduler):
    """C ← C·gamma every ``step_size`` steps (the factors accumulate)."""

    def __init__(self, optimizer, *, step_size: int, gamma: float, last_epoch: int = -1):
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch=last_epoch)

    def get_max_grad_norm(self) -> float:
        return self._stepped(self.step_size, self.gamma)
