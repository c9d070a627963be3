"""The last pass of a DP step over all summed gradients: add σC·N(0, 1), then scale, in place.

The gradients live in one flat buffer (``flat``, the optimizer's ``GradBuffer``) so that noise is
one draw over every parameter. The torch reference draws and applies the noise a chunk at a time
(``NOISE_CHUNK_NUMEL`` elements), so no full-size noise tensor exists; on CPU its draws equal one
full-size ``torch.randn`` from the same generator (the chunks are multiples of 16 elements, the block
of torch's CPU normal sampler, and a short tail joins the chunk before it). The Triton kernel fuses
draw, add and scale (Philox, seeded from ``generator``). Secure mode does not come here: it draws
from the OS CSPRNG (``fastdp.utils.secure_random``).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import op

#: elements per chunk of the noise pass: 1 MiB of float32 noise at a time (a multiple of 16, see above)
NOISE_CHUNK_NUMEL = 1 << 18


def noise_chunks(flat: torch.Tensor, chunk: int = NOISE_CHUNK_NUMEL) -> Iterator[torch.Tensor]:
    """Consecutive views of the 1-D ``flat``, ``chunk`` elements each; a tail shorter than 16 elements joins
    the chunk before it (torch's CPU sampler draws a tensor under 16 elements differently)."""
    n = flat.numel()
    start = 0
    while start < n:
        stop = min(start + chunk, n)
        if n - stop < 16:
            stop = n
        yield flat[start:stop]
        start = stop


@op("add_noise_and_scale")
def add_noise_and_scale(flat: torch.Tensor, std: float, scale: float, generator: Optional[torch.Generator] = None) -> None:
    """In place: ``flat ← (flat + std · N(0, 1)) · scale``, a chunk at a time (``flat`` contiguous, 1-D)."""
    if std == 0 and scale == 1:
        return
    for chunk in noise_chunks(flat):
        if std != 0:
            chunk.add_(torch.randn(chunk.shape, generator=generator, device=chunk.device, dtype=chunk.dtype), alpha=std)
        if scale != 1:
            chunk.mul_(scale)
