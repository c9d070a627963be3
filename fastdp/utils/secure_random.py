"""Randomness for ``secure_mode``: every draw comes from the operating system's CSPRNG.

torch's and numpy's generators are not cryptographically secure: their state can be
recovered from outputs, and with it the noise. In secure mode fastdp draws uniforms
from ``os.urandom`` (53 random bits per float64) and Gaussians by Box–Muller in
float64. Like Opacus's secure mode, each Gaussian is the sum of four draws divided
by two, which blurs the fine structure of floating-point samples that the attack of
Mironov (2012) exploits (Holohan & Braghin 2021, §5.2). It is slower than a PRNG
and cannot be seeded — that is the point.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


class SecureRandom:
    """A generator-like source of CSPRNG uniforms and Gaussians (float64, on the CPU)."""

    def rand(self, n: int) -> torch.Tensor:
        """``n`` uniforms on [0, 1) with 53 random bits each."""
        words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return torch.from_numpy((words >> np.uint64(11)).astype(np.float64) * 2.0**-53)

    def randn(self, n: int) -> torch.Tensor:
        """``n`` standard Gaussians: (sum of four Box–Muller draws) / 2."""
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(2):  # each Box-Muller pair gives two independent draws
            u1 = 1.0 - self.rand(n)  # (0, 1]: the log is finite
            u2 = self.rand(n)
            radius = torch.sqrt(-2.0 * torch.log(u1))
            total += radius * torch.cos(2 * math.pi * u2)
            total += radius * torch.sin(2 * math.pi * u2)
        return total / 2

    def __repr__(self) -> str:
        return "SecureRandom(os.urandom)"


def uniform(n: int, generator=None) -> torch.Tensor:
    """``n`` uniforms from a torch generator (or the global one) or a ``SecureRandom``."""
    if isinstance(generator, SecureRandom):
        return generator.rand(n)
    return torch.rand(n, generator=generator)


def normal(n: int, generator=None, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``n`` standard Gaussians on ``device`` from a torch generator or a ``SecureRandom``."""
    if isinstance(generator, SecureRandom):
        return generator.randn(n).to(device=device, dtype=dtype)
    return torch.randn(n, generator=generator, device=device, dtype=dtype)
