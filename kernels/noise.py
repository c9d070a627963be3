"""The DP noise pass in one kernel: flat ← (flat + std · N(0, 1)) · scale, in place.

Normals come from Triton's Philox counter RNG, seeded by one draw from the caller's
torch generator (or the global torch RNG), so ``torch.manual_seed`` reproduces a run.
Each Philox call yields four 32-bit words, turned into four normals by Box–Muller;
a program covers 4·QUARTER elements as four contiguous quarters.

Box–Muller here maps the words to uniforms in (0, 1] (never 0, so no floor is needed):
Triton's own ``randn`` floors u at 1e-7, which cuts the Gaussian tails at about 5.7σ,
a cut that a large model's noise draw would hit every few steps. Here the largest
magnitude is about 6.7σ, like 32-bit-uniform samplers in general. Secure mode does not
come here (it draws from the OS CSPRNG).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastdp.ops import noise as _ops
from fastdp.ops import register_impl

from ._triton_utils import KERNEL_DTYPES, check_device


@triton.jit
def _uniform_0_1(word):
    """A uint32 word as a float32 uniform in (0, 1]: (word + 1/2) / 2^32."""
    return word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10


@triton.jit
def _box_muller(word1, word2):
    radius = tl.sqrt(-2.0 * tl.log(_uniform_0_1(word1)))
    angle = 6.283185307179586 * _uniform_0_1(word2)
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _noise_and_scale_quarter(flat_ptr, offs, n, noise, std, scale):
    values = tl.load(flat_ptr + offs, mask=offs < n)
    noisy = (values.to(tl.float32) + std * noise) * scale
    tl.store(flat_ptr + offs, noisy.to(flat_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _add_noise_and_scale_kernel(flat_ptr, seed_ptr, n, std, scale, QUARTER: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    counters = program * QUARTER + tl.arange(0, QUARTER)  # one Philox counter per 4 elements
    word1, word2, word3, word4 = tl.randint4x(tl.load(seed_ptr), counters)
    noise1, noise2 = _box_muller(word1, word2)
    noise3, noise4 = _box_muller(word3, word4)
    start = program * (4 * QUARTER) + tl.arange(0, QUARTER)
    _noise_and_scale_quarter(flat_ptr, start, n, noise1, std, scale)
    _noise_and_scale_quarter(flat_ptr, start + QUARTER, n, noise2, std, scale)
    _noise_and_scale_quarter(flat_ptr, start + 2 * QUARTER, n, noise3, std, scale)
    _noise_and_scale_quarter(flat_ptr, start + 3 * QUARTER, n, noise4, std, scale)


@triton.jit
def _scale_kernel(flat_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(flat_ptr + offs, mask=offs < n)
    tl.store(flat_ptr + offs, (values.to(tl.float32) * scale).to(flat_ptr.dtype.element_ty), mask=offs < n)


#: the same on GPU and in the interpreter, so both turn one seed into the same noise
#: (up to the last bits of log/cos/sin).
_QUARTER = 1024


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """One Philox seed from ``generator`` (or the global RNG of ``device``), left on ``device``.

    The seed stays a tensor so that a CUDA draw needs no host sync.
    """
    if generator is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=device)
    else:
        seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)
    return seed.to(device)


def add_noise_and_scale(flat: torch.Tensor, std: float, scale: float,
                        generator: Optional[torch.Generator] = None) -> None:
    """In place: ``flat ← (flat + std · N(0, 1)) · scale`` (fp32 arithmetic, stored in flat's dtype)."""
    std, scale = float(std), float(scale)
    if flat.numel() == 0 or (std == 0 and scale == 1):
        return
    if flat.dtype not in KERNEL_DTYPES:
        return _ops.add_noise_and_scale.torch_reference(flat, std, scale, generator)
    check_device(flat)
    work = flat if flat.is_contiguous() else flat.contiguous()
    n = work.numel()
    if std == 0:  # the reference draws nothing then; neither do we
        _scale_kernel[(triton.cdiv(n, 4 * _QUARTER),)](work, n, scale, BLOCK=4 * _QUARTER)
    else:
        seed = draw_seed(generator, work.device)
        _add_noise_and_scale_kernel[(triton.cdiv(n, 4 * _QUARTER),)](work, seed, n, std, scale, QUARTER=_QUARTER)
    if work is not flat:
        flat.copy_(work)


register_impl("add_noise_and_scale", "triton", add_noise_and_scale)
