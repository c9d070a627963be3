"""The accountant interface shared by RDP, GDP, PRV and PLD (Opacus-compatible).

An accountant only records what happened — a history of
``(noise_multiplier, sample_rate, num_steps)`` segments — and turns that history
into ε for a given δ on demand. Consecutive steps with the same (σ, q) are merged
into one segment, so a long run costs one entry, not one per step.
"""

from __future__ import annotations

import abc
import copy
from typing import Callable, List, Tuple

from .validation import check_history, check_noise_multiplier, check_sample_rate

Segment = Tuple[float, float, int]


class IAccountant(abc.ABC):
    """Base class: subclasses implement :meth:`get_epsilon` and :meth:`mechanism`."""

    #: whether ``get_epsilon`` is a valid upper bound on the true ε (False: an approximation, e.g. the
    #: CLT of GDP, which can under-report). Budgets are never calibrated with an approximation alone
    #: (``get_noise_multiplier`` warns, ``PrivacyEngine.make_private_with_epsilon`` calibrates with PRV).
    is_upper_bound: bool = True

    def __init__(self):
        self.history: List[Segment] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step of the Poisson-subsampled Gaussian mechanism."""
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + 1)
        else:
            self.history.append((sigma, q, 1))

    @abc.abstractmethod
    def get_epsilon(self, delta: float, *args, **kwargs) -> float:
        """ε of the whole history at the given δ (0.0 for an empty history)."""

    @classmethod
    @abc.abstractmethod
    def mechanism(cls) -> str:
        """Short name of the accounting method, as accepted by ``create_accountant``."""

    def __len__(self) -> int:
        # Opacus semantics: the number of history segments, not of steps.
        return len(self.history)

    def _checked_history(self) -> List[Segment]:
        """The history, validated (it may have been assigned directly by the user)."""
        return check_history(self.history)

    def state_dict(self, destination=None) -> dict:
        """The full history and the mechanism name (what a checkpoint needs)."""
        if destination is None:
            destination = {}
        destination["history"] = copy.deepcopy(self.history)
        destination["mechanism"] = self.mechanism()
        return destination

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a history saved by :meth:`state_dict` of an accountant of the same mechanism."""
        if not isinstance(state_dict, dict) or "history" not in state_dict or "mechanism" not in state_dict:
            raise ValueError(
                "state_dict must be a dict with 'history' and 'mechanism' keys, as returned by accountant.state_dict()"
            )
        if state_dict["mechanism"] != self.mechanism():
            raise ValueError(
                f"state_dict is of a {state_dict['mechanism']!r} accountant and cannot be loaded into a "
                f"{self.mechanism()!r} one; create the accountant (or PrivacyEngine) with "
                f"accountant={state_dict['mechanism']!r}"
            )
        self.history = check_history(copy.deepcopy(state_dict["history"]))

    def get_optimizer_hook_fn(self, sample_rate: float) -> Callable:
        """A hook for ``DPOptimizer.attach_step_hook``: records one step per optimizer step.

        With virtual steps (gradient accumulation over k Poisson batches) the
        effective sample rate of one optimizer step is k·q.
        """
        check_sample_rate(sample_rate)

        def hook_fn(optim):
            self.step(
                noise_multiplier=optim.noise_multiplier,
                sample_rate=sample_rate * getattr(optim, "accumulated_iterations", 1),
            )

        return hook_fn
