"""Clip factors from per-sample gradient norms: how much of each sample's gradient enters the sum.

Every policy guarantees ``c_i * ||g_i|| <= C`` for every sample i; samples whose
norm is not finite get ``c_i = 0`` (the engine also zeroes their rows, since
0 * inf is NaN).
"""

from __future__ import annotations

import torch

STABILITY_EPS = 1e-6


def check_max_grad_norm(value, name: str = "max_grad_norm") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class FlatClipping:
    """c_i = min(1, C / (||g_i|| + 1e-6)) with ||g_i|| over all parameters (Abadi et al. 2016)."""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        factors = (self.max_grad_norm / (norms + STABILITY_EPS)).clamp(max=1.0)
        return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


class AutomaticClipping:
    """c_i = C / (||g_i|| + γ): normalise every gradient (Bu et al. 2023, "automatic clipping")."""

    def __init__(self, max_grad_norm: float, stability: float = 0.01):
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.stability = check_max_grad_norm(stability, "stability")

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        factors = self.max_grad_norm / (norms + self.stability)
        return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))
