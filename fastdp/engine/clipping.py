"""Clip factors from per-sample gradient norms: how much of each sample's gradient enters the sum.

Every policy guarantees ``c_i * ||g_i|| <= C`` for every sample i, with ``||g_i||`` the engine's
upper bound of the sample's contribution as computed (``fastdp.ops.rounding``); samples whose
norm is not finite get ``c_i = 0`` (the engine also zeroes their rows, since 0 * inf is NaN).
"""

from __future__ import annotations

import math
from typing import Dict

import torch

STABILITY_EPS = 1e-6
#: factors are computed from norms raised by this much: a factor is then rounded to float32 and
#: multiplies once more (both within 2⁻²⁴ relative), and c·‖g‖ must still be ≤ C
FACTOR_ROUNDING_MARGIN = 2.0**-21


def check_max_grad_norm(value, name: str = "max_grad_norm") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class ClippingPolicy:
    """Maps per-sample norms to clip factors; by default one factor vector for every parameter."""

    max_grad_norm: float  # the L2 sensitivity of one sample's clipped contribution (sets the noise)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def factors_by_param(self, norm_sq_by_param: Dict[int, torch.Tensor], norms: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Clip factors per parameter (keyed like ``norm_sq_by_param``), from the per-parameter squared
        norms and the whole-model norms."""
        shared = self.factors(norms)
        return {key: shared for key in norm_sq_by_param}


def _finite_factors(bound, norms: torch.Tensor) -> torch.Tensor:
    factors = (bound / (norms * (1 + FACTOR_ROUNDING_MARGIN) + STABILITY_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


class FlatClipping(ClippingPolicy):
    """c_i = min(1, C / (||g_i|| + 1e-6)) with ||g_i|| over all parameters (Abadi et al. 2016)."""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        return _finite_factors(self.max_grad_norm, norms)


class PerLayerClipping(ClippingPolicy):
    """Each parameter p clipped to its own bound C_p (Opacus's "per_layer"): c_{i,p} =
    min(1, C_p / (||g_{i,p}|| + 1e-6)). One sample then moves the sum by at most
    sqrt(sum_p C_p²), which is this policy's ``max_grad_norm`` (and sets the noise)."""

    def __init__(self, bounds: Dict[int, float]):
        self.bounds = {key: check_max_grad_norm(value) for key, value in bounds.items()}
        self.max_grad_norm = math.sqrt(sum(b * b for b in self.bounds.values()))

    def factors_by_param(self, norm_sq_by_param, norms):
        missing = [key for key in norm_sq_by_param if key not in self.bounds]
        if missing:
            raise ValueError(
                "a trainable parameter has no per-layer bound: it is not in the optimizer; freeze it "
                "(requires_grad=False) or add it to the optimizer and to max_grad_norm"
            )
        return {key: _finite_factors(self.bounds[key], norm_sq.sqrt()) for key, norm_sq in norm_sq_by_param.items()}


class AutomaticClipping(ClippingPolicy):
    """c_i = C / (||g_i|| + γ): normalise every gradient (Bu et al. 2023, "automatic clipping")."""

    def __init__(self, max_grad_norm: float, stability: float = 0.01):
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.stability = check_max_grad_norm(stability, "stability")

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        factors = self.max_grad_norm / (norms * (1 + FACTOR_ROUNDING_MARGIN) + self.stability)
        return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))
