"""The last pass of a DP step over all summed gradients: add σC·N(0, 1), then scale.

The gradients live in one flat fp32 buffer (``flat``) so that noise is one draw over
every parameter; the Triton kernel fuses draw, add and scale (Philox, seeded from
``generator``). Secure mode does not come here: it draws from the OS CSPRNG
(``fastdp.utils.secure_random``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import op


@op("add_noise_and_scale")
def add_noise_and_scale(flat: torch.Tensor, std: float, scale: float, generator: Optional[torch.Generator] = None) -> None:
    """In place: ``flat ← (flat + std · N(0, 1)) · scale``."""
    if std != 0:
        noise = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
        flat.add_(noise, alpha=std)
    if scale != 1:
        flat.mul_(scale)
