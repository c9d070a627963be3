"""Deliberately broken DP steps, to show that the audit catches a leak.

Each fault changes what the engine *does* while the accountant keeps being told the intended
σ, q and C — the shape of a real implementation bug. They are built from the public API
(a ``ClippingPolicy`` and a ``DPOptimizer`` subclass), never by editing the engine:

- ``"no-clipping"``: every clip factor is 1, so a sample moves the sum by its full norm.
- ``"noise-scale=F"`` (0 <= F < 1): the optimizer draws F·σ·C noise instead of σ·C.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..engine.clipping import ClippingPolicy
from ..optimizers import DPOptimizer

FAULTS = ("no-clipping", "noise-scale=F")


class NoClipping(ClippingPolicy):
    """Claims the bound C (which still sets the noise) but never clips: factor 1 for every finite norm."""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = float(max_grad_norm)

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(norms).to(norms.dtype)


class QuietNoiseDPOptimizer(DPOptimizer):
    """A DPOptimizer that adds ``noise_scale`` times the noise it accounts for."""

    noise_scale = 1.0

    @property
    def gradient_noise_multiplier(self) -> float:
        return super().gradient_noise_multiplier * self.noise_scale


def parse_fault(fault: Optional[str]) -> Tuple[Optional[str], float]:
    """``None``, ``"no-clipping"`` or ``"noise-scale=F"`` → (name, noise scale)."""
    if fault is None or fault == "none":
        return None, 1.0
    if fault == "no-clipping":
        return fault, 1.0
    if isinstance(fault, str) and fault.startswith("noise-scale="):
        try:
            scale = float(fault.split("=", 1)[1])
        except ValueError:
            scale = float("nan")
        if not 0 <= scale < 1:
            raise ValueError(f"fault 'noise-scale=F' needs 0 <= F < 1 (less noise than accounted), got {fault!r}")
        return "noise-scale", scale
    raise ValueError(f"fault must be None, 'no-clipping' or 'noise-scale=F' (0 <= F < 1), got {fault!r}")
