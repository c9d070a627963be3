"""Per-sample weight gradients of LayerNorm, GroupNorm, InstanceNorm and RMSNorm without storing x̂.

In the common view ``x, grad: [B, M, C, S]`` (fastdp.ops.norms) the per-sample weight
gradient is ``sum over m, s of grad ⊙ x̂`` per (b, channel). Two launches:

1. statistics: one program per (b, m, group) reads its C/groups × S block once and keeps
   mean and 1/sqrt(var + eps) (RMSNorm: 1/sqrt(mean(x²) + eps)), merging per-tile means
   and squared deviations (Chan et al.) so a large mean does not cancel the variance;
2. accumulation: each program owns a tile of channels of one sample and a slice of the
   (m, s) rows, recomputes x̂ = (x - mean)·rstd on the fly and sums grad ⊙ x̂ in fp32.
   Row slices write separate partial sums that torch adds, so results are deterministic.

Only the [B·M·groups] statistics are written besides the [B, C] result. The kernel takes
any (M, S, groups) view, a superset of the views the torch reference accepts. Empty,
float64 or mixed-dtype inputs run the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.ops import norms as _ops
from fastdp.ops import register_impl

from ._triton_utils import reference_unless_handled

#: Tile sizes: elements per step of the statistics pass; (rows, channels) of the accumulation tile.
BLOCK_STATS = 1024
BLOCK_ROWS = 32
MAX_BLOCK_C = 64
#: Aim for about this many accumulation programs (row slices are added until there are).
TARGET_PROGRAMS = 1024


@triton.jit
def _norm_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr, M, S, C_g, groups, sxb, sxm, sxc, sxs, eps,
    RMS: tl.constexpr, BLOCK: tl.constexpr,
):
    """mean and rstd of the block (b, m, group): channels [group·C_g, (group+1)·C_g) × positions S."""
    row = tl.program_id(0)  # = (b·M + m)·groups + group
    group = row % groups
    m = (row // groups) % M
    b = (row // (groups * M)).to(tl.int64)
    base = x_ptr + b * sxb + m * sxm + group * C_g * sxc
    size = C_g * S
    count = 0.0
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from the mean (RMS: sum of squares)
    for e0 in range(0, size, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        inside = e < size
        v = tl.load(base + (e // S) * sxc + (e % S) * sxs, mask=inside, other=0.0).to(tl.float32)
        if RMS:
            m2 += tl.sum(v * v, axis=0)
        else:
            tile_count = tl.sum(inside.to(tl.float32), axis=0)
            tile_mean = tl.sum(v, axis=0) / tile_count
            deviation = tl.where(inside, v - tile_mean, 0.0)
            tile_m2 = tl.sum(deviation * deviation, axis=0)
            total = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / total)
            m2 += tile_m2 + delta * delta * (count * tile_count / total)
            count = total
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(m2 / size + eps))


@triton.jit
def _norm_weight_grad_kernel(
    x_ptr, grad_ptr, mean_ptr, rstd_ptr, partial_ptr,
    M, C, S, C_g, groups, rows_per_slice, slices,
    sxb, sxm, sxc, sxs, sgb, sgm, sgc, sgs,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """partial[b, slice, c] = sum over the slice's rows r = (m, s) of grad ⊙ (x - mean)·rstd."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tile_c = pid % tiles_c
    row_slice = (pid // tiles_c) % slices
    b = (pid // (tiles_c * slices)).to(tl.int64)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    group = c // C_g
    rows = M * S
    first = row_slice * rows_per_slice
    last = tl.minimum(first + rows_per_slice, rows)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(first, last, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < last)[:, None] & c_mask[None, :]
        m = r // S
        s = r % S
        x = tl.load(x_ptr + b * sxb + (m * sxm + s * sxs)[:, None] + (c * sxc)[None, :], mask=mask, other=0.0)
        g = tl.load(grad_ptr + b * sgb + (m * sgm + s * sgs)[:, None] + (c * sgc)[None, :], mask=mask, other=0.0)
        stat = (b * M + m)[:, None] * groups + group[None, :]
        mean = tl.load(mean_ptr + stat, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + stat, mask=mask, other=0.0)
        acc += g.to(tl.float32) * ((x.to(tl.float32) - mean) * rstd)
    tl.store(partial_ptr + (b * slices + row_slice) * C + c, tl.sum(acc, axis=0), mask=c_mask)


@reference_unless_handled(_ops.norm_weight_grad_sample, 0, 1)  # empty, float64 or mixed dtypes: the reference
def norm_weight_grad_sample(x: torch.Tensor, grad: torch.Tensor, num_groups: int, eps: float, rms: bool):
    """Triton ``norm_weight_grad_sample``: per-sample weight gradients [B, C], float32."""
    if x.dim() != 4 or grad.shape != x.shape:
        raise ValueError(f"x and grad must both be [B, M, C, S]; got {tuple(x.shape)} and {tuple(grad.shape)}")
    B, M, C, S = x.shape
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={C}")
    C_g = C // num_groups
    mean = torch.empty(B * M * num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _norm_stats_kernel[(mean.numel(),)](
        x, mean, rstd, M, S, C_g, num_groups, *x.stride(), float(eps),
        RMS=bool(rms), BLOCK=min(BLOCK_STATS, triton.next_power_of_2(C_g * S)),
    )
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(C))
    block_r = min(BLOCK_ROWS, triton.next_power_of_2(M * S))
    tiles_c = triton.cdiv(C, block_c)
    row_blocks = triton.cdiv(M * S, block_r)
    slices = max(1, min(row_blocks, TARGET_PROGRAMS // max(1, B * tiles_c)))
    rows_per_slice = triton.cdiv(row_blocks, slices) * block_r
    slices = triton.cdiv(M * S, rows_per_slice)
    partial = torch.empty(B, slices, C, dtype=torch.float32, device=x.device)
    _norm_weight_grad_kernel[(B * slices * tiles_c,)](
        x, grad, mean, rstd, partial, M, C, S, C_g, num_groups, rows_per_slice, slices,
        *x.stride(), *grad.stride(), BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return partial.sum(1)


register_impl("norm_weight_grad_sample", "triton", norm_weight_grad_sample)
