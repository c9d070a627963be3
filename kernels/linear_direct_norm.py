"""Per-sample squared gradient norms of a linear-type layer by the direct method.

Weight: ||g_iᵀ a_i||²_F. Each program forms one [BLOCK_P, BLOCK_D] tile of G_i = g_iᵀ a_i
in registers (fp32, summed over T), squares and sums it, and writes one number: the
[B, p, d] per-sample gradients never reach memory. The per-tile partial sums are added
up in torch afterwards, which keeps the result deterministic (no atomics).

Bias: ||Σ_t g_it||², a separate small kernel (the op API asks for it on its own).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.ops import linear as _ops
from fastdp.ops import register_impl, rounding

from ._triton_utils import (INTERPRETER_BLOCK, Launcher, check_activations, dot_fp32_error, reference_unless_handled,
                            use_interpreter)
from .linear_grad_sample import PER_SAMPLE_TILE_CONFIGS, PER_SAMPLE_TILE_INTERPRETER, per_sample_grad_tile


@triton.jit
def _linear_direct_norm_kernel(a_ptr, g_ptr, partials_ptr, T, d, p,
                               stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp, partials_stride,
                               BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    sample = tl.program_id(0)
    tile_p = tl.program_id(1)
    tile_d = tl.program_id(2)
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tile_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tile = per_sample_grad_tile(a_ptr, g_ptr, sample, offs_p, offs_d, T, d, p,
                                stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp,
                                BLOCK_T, BLOCK_P, BLOCK_D)
    tile_index = tile_p * tl.num_programs(2) + tile_d
    tile = tile.to(tl.float64)  # exact squares, float64 sum
    tl.store(partials_ptr + sample.to(tl.int64) * partials_stride + tile_index, tl.sum(tile * tile))


# The partials buffer is sized for the smallest tiles; larger tiles leave its tail at zero,
# so autotuning must zero it between trial runs.
_launch = Launcher(_linear_direct_norm_kernel, PER_SAMPLE_TILE_CONFIGS, key=["d", "p"],
                   interpreter_config=PER_SAMPLE_TILE_INTERPRETER, reset_to_zero=["partials_ptr"])


@reference_unless_handled(_ops.linear_norm_sq_direct, 0, 1, check=check_activations)
def linear_norm_sq_direct(a: torch.Tensor, g: torch.Tensor, mass=None) -> torch.Tensor:
    """An upper bound of ||g_iᵀ a_i||²_F per sample, float64 [B], without writing any per-sample gradient."""
    B, T, d = a.shape
    p = g.shape[-1]
    max_tiles = triton.cdiv(p, _launch.smallest("BLOCK_P")) * triton.cdiv(d, _launch.smallest("BLOCK_D"))
    partials = torch.zeros(B, max_tiles, dtype=torch.float64, device=a.device)
    grid = lambda meta: (B, triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _launch(grid, a, g, partials, T, d, p, *a.stride(), *g.stride(), partials.stride(0))
    mass = rounding.term_mass(a, g) if mass is None else mass
    return rounding.direct_norm_sq_upper(partials.sum(1), mass, dot_fp32_error(T, a.dtype),
                                          rounding.gamma(p * d, rounding.UNIT_ROUNDOFF[torch.float64]))


@triton.jit
def _linear_bias_norm_kernel(g_ptr, partials_ptr, T, p, stride_gb, stride_gt, stride_gp,
                             BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    sample = tl.program_id(0)
    tile_p = tl.program_id(1)
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    g_sample = g_ptr + sample.to(tl.int64) * stride_gb
    bias_grad = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        g_tile = tl.load(g_sample + offs_t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                         mask=(offs_t[:, None] < T) & (offs_p[None, :] < p), other=0.0)
        bias_grad += tl.sum(g_tile.to(tl.float32), axis=0)
    bias_grad = bias_grad.to(tl.float64)  # exact squares, float64 sum
    tl.store(partials_ptr + sample.to(tl.int64) * tl.num_programs(1) + tile_p, tl.sum(bias_grad * bias_grad))


_BIAS_BLOCKS = ({"BLOCK_T": INTERPRETER_BLOCK, "BLOCK_P": INTERPRETER_BLOCK} if use_interpreter()
                else {"BLOCK_T": 32, "BLOCK_P": 128})


def _check_sequence(g: torch.Tensor) -> None:
    if g.dim() != 3:
        raise ValueError(f"g must be [B, T, p], got shape {tuple(g.shape)} (reshape to the sequence view first)")


@reference_unless_handled(_ops.linear_bias_norm_sq, 0, check=_check_sequence)
def linear_bias_norm_sq(g: torch.Tensor, mass=None) -> torch.Tensor:
    """An upper bound of ||Σ_t g_it||² per sample: float64 [B]."""
    B, T, p = g.shape
    tiles = triton.cdiv(p, _BIAS_BLOCKS["BLOCK_P"])
    partials = torch.empty(B, tiles, dtype=torch.float64, device=g.device)
    _linear_bias_norm_kernel[(B, tiles)](g, partials, T, p, *g.stride(), **_BIAS_BLOCKS)
    mass = rounding.bias_term_mass(g) if mass is None else mass
    return rounding.direct_norm_sq_upper(partials.sum(1), mass, rounding.gamma(T + 8),
                                          rounding.gamma(p, rounding.UNIT_ROUNDOFF[torch.float64]))


register_impl("linear_norm_sq_direct", "triton", linear_norm_sq_direct)
register_impl("linear_bias_norm_sq", "triton", linear_bias_norm_sq)
