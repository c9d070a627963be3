"""Opacus's import path ``opacus.optimizers.optimizer``: DPOptimizer and the helpers its subclasses use."""

from __future__ import annotations

import torch

from ..utils.secure_random import SecureRandom, normal
from .dp_optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed  # noqa: F401


def _generate_noise(std: float, reference: torch.Tensor, generator=None, secure_mode: bool = False) -> torch.Tensor:
    """Gaussian noise N(0, std²) of ``reference``'s shape, dtype and device (Opacus's helper, for subclasses
    that add noise themselves). ``secure_mode`` draws from the OS CSPRNG (``fastdp.utils.secure_random``)."""
    if std == 0:
        return torch.zeros_like(reference)
    if secure_mode or isinstance(generator, SecureRandom):
        draw = normal(reference.numel(), generator if isinstance(generator, SecureRandom) else SecureRandom(),
                      device=reference.device, dtype=reference.dtype)
        return draw.view_as(reference) * std
    return torch.normal(0.0, std, size=reference.shape, device=reference.device, dtype=reference.dtype,
                        generator=generator)


__all__ = ["DPOptimizer", "_check_processed_flag", "_mark_as_processed", "_generate_noise"]
