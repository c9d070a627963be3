"""What the noise and clipping-bound schedulers share: torch LR-scheduler semantics on a DPOptimizer attribute.

``step()`` (once per epoch, or as you choose) advances ``last_epoch`` and sets the attribute to
``get_value()``. The accountant reads ``optimizer.noise_multiplier`` at every optimizer step, so a
noise schedule is accounted step by step. ``state_dict()`` holds every attribute but the optimizer
and plain functions (a lambda cannot be pickled; it comes from the code that builds the scheduler).
"""

from __future__ import annotations

import types
from typing import Dict


class _DPOptimizerScheduler:
    #: the DPOptimizer attribute this scheduler drives
    attribute: str = ""

    def __init__(self, optimizer, *, last_epoch: int = -1):
        if not hasattr(optimizer, self.attribute) or not hasattr(optimizer, "original_optimizer"):
            raise ValueError(
                f"{type(self).__name__} needs a DPOptimizer (it sets optimizer.{self.attribute}); got "
                f"{type(optimizer).__name__}: pass the optimizer returned by PrivacyEngine.make_private"
            )
        self.optimizer = optimizer
        self.last_epoch = last_epoch
        self.step()

    def state_dict(self) -> Dict:
        """Every attribute but the optimizer and functions (as torch's LambdaLR)."""
        return {
            key: value for key, value in self.__dict__.items()
            if key != "optimizer" and not isinstance(value, (types.FunctionType, types.LambdaType))
        }

    def load_state_dict(self, state_dict: Dict) -> None:
        self.__dict__.update(state_dict)

    def get_value(self) -> float:
        raise NotImplementedError

    # the schedules Opacus offers for both attributes, written once
    def _exponential(self, gamma: float) -> float:
        """The attribute times ``gamma`` at every step after the first (the factors accumulate)."""
        current = getattr(self.optimizer, self.attribute)
        return current if self.last_epoch == 0 else current * gamma

    def _stepped(self, step_size: int, gamma: float) -> float:
        """The attribute times ``gamma`` every ``step_size`` steps (the factors accumulate)."""
        current = getattr(self.optimizer, self.attribute)
        return current if self.last_epoch == 0 or self.last_epoch % step_size != 0 else gamma * current

    def step(self) -> None:
        self.last_epoch += 1
        setattr(self.optimizer, self.attribute, self.get_value())
