"""Per-sample conv weight-gradient norms and per-sample gradients by implicit im2col.

A convolution is, per (sample, group), a linear layer over T = output positions with
d = (C_in/groups)·prod(kernel) inputs and p = C_out/groups outputs (fastdp.ops.conv). The
unfold matrix A [T, d] is never built: its element (t, k) is the padded input at

    x[b, group·C_g + c, o·stride + j·dilation]    (t ↔ output position o, k ↔ (c, kernel offset j))

and that address splits into a row part (from t) plus a column part (from k), so each
tile of A is one gather from x. 1d and 2d convolutions run as 3d ones with unit dims.

- direct: per (sample, group, tile of G = gᵀA), accumulate the tile over T with tl.dot
  and keep only its squared sum (or store the tile: ``conv_weight_grad_sample``).
- ghost (small T): sum over tile pairs (t, s) of (A Aᵀ)_ts · (g gᵀ)_ts, upper triangle only.
The shape chooses between them exactly as the torch reference does. Partial sums go to a
buffer summed by torch, so results are deterministic (no atomics).

``conv_weight_clipped_grad`` stays on torch: it is the ordinary cuDNN weight gradient of
the clip-scaled output gradient; a Triton version would re-implement that implicit GEMM with
nothing to fuse but the per-sample scaling.

Tiles are multiplied by ``_triton_utils.dot_fp32`` (fp32 as tf32x3, not TF32: an
under-estimated norm weakens the clipping bound that the privacy guarantee rests on;
bf16/fp16 products are exact in the fp32 accumulator). Empty, float64 or mixed-dtype
inputs run the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdp.ops import conv as _ops
from fastdp.ops import register_impl, rounding
from fastdp.ops.linear import choose_linear_norm_method

# importing _triton_utils also fixes bf16 tl.dot in the interpreter
from ._triton_utils import check_device, dot_fp32, dot_fp32_error, reference_unless_handled

#: Largest tile edges: along C_out/groups and the patch width d, and along output positions T.
MAX_BLOCK_PK = 64
MAX_BLOCK_T = 32


@triton.jit
def _patch_rows(t, T, OUT_H: tl.constexpr, OUT_W: tl.constexpr, SD, SH, SW, sxd, sxh, sxw):
    """Row part of the im2col address for output positions ``t``, and their mask."""
    od = t // (OUT_H * OUT_W)
    oh = (t // OUT_W) % OUT_H
    ow = t % OUT_W
    return od * SD * sxd + oh * SH * sxh + ow * SW * sxw, t < T


@triton.jit
def _patch_cols(k, d, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DD, DH, DW, sxc, sxd, sxh, sxw):
    """Column part of the im2col address for weight columns ``k`` = (channel, kd, kh, kw), and their mask."""
    c = k // (KD * KH * KW)
    kd = (k // (KH * KW)) % KD
    kh = (k // KW) % KH
    kw = k % KW
    return c * sxc + kd * DD * sxd + kh * DH * sxh + kw * DW * sxw, k < d


@triton.jit
def _conv_direct_kernel(
    x_ptr, g_ptr, out_ptr,
    T, d, p, groups, C_g,
    sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgt,
    SD, SH, SW, DD, DH, DW,
    OUT_H: tl.constexpr, OUT_W: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_K] tile of G = gᵀA for one (sample, group): its squared sum, or the tile itself."""
    pid = tl.program_id(0)
    tiles_p = tl.cdiv(p, BLOCK_P)
    tiles_k = tl.cdiv(d, BLOCK_K)
    tile = pid % (tiles_p * tiles_k)
    group = (pid // (tiles_p * tiles_k)) % groups
    b = (pid // (tiles_p * tiles_k * groups)).to(tl.int64)

    rows_p = (tile // tiles_k) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols_k = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_offset, col_mask = _patch_cols(cols_k, d, KD, KH, KW, DD, DH, DW, sxc, sxd, sxh, sxw)
    mask_p = rows_p < p
    x_base = x_ptr + b * sxb + group * C_g * sxc
    g_base = g_ptr + b * sgb + (group * p + rows_p) * sgc

    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        row_offset, row_mask = _patch_rows(t, T, OUT_H, OUT_W, SD, SH, SW, sxd, sxh, sxw)
        a_mask = row_mask[:, None] & col_mask[None, :]
        a = tl.load(x_base + row_offset[:, None] + col_offset[None, :], mask=a_mask, other=0.0)
        g_t = tl.load(g_base[:, None] + t[None, :] * sgt, mask=mask_p[:, None] & row_mask[None, :], other=0.0)
        acc = dot_fp32(g_t, a, acc)

    if STORE_GRAD:  # out: [B, C_out, d]
        out = out_ptr + (b * groups * p + group * p + rows_p)[:, None] * d + cols_k[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & col_mask[None, :])
    else:
        acc = acc.to(tl.float64)  # exact squares, float64 sum
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _conv_ghost_kernel(
    x_ptr, g_ptr, out_ptr,
    T, d, p, groups, C_g,
    sxb, sxc, sxd, sxh, sxw, sgb, sgc, sgt,
    SD, SH, SW, DD, DH, DW,
    OUT_H: tl.constexpr, OUT_W: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """sum over one [BLOCK_T, BLOCK_T] block (i, j) of (A Aᵀ) ⊙ (g gᵀ) for one (sample, group).

    Both Grams are symmetric, so blocks below the diagonal are skipped (they leave 0) and
    blocks above it count twice.
    """
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(T, BLOCK_T)
    pair = pid % (tiles_t * tiles_t)
    group = (pid // (tiles_t * tiles_t)) % groups
    b = (pid // (tiles_t * tiles_t * groups)).to(tl.int64)
    i = pair // tiles_t
    j = pair % tiles_t
    if j >= i:
        t_i = i * BLOCK_T + tl.arange(0, BLOCK_T)
        t_j = j * BLOCK_T + tl.arange(0, BLOCK_T)
        rows_i, mask_i = _patch_rows(t_i, T, OUT_H, OUT_W, SD, SH, SW, sxd, sxh, sxw)
        rows_j, mask_j = _patch_rows(t_j, T, OUT_H, OUT_W, SD, SH, SW, sxd, sxh, sxw)
        x_base = x_ptr + b * sxb + group * C_g * sxc

        a_gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            cols, col_mask = _patch_cols(k0 + tl.arange(0, BLOCK_K), d, KD, KH, KW, DD, DH, DW, sxc, sxd, sxh, sxw)
            a_i = tl.load(x_base + rows_i[:, None] + cols[None, :], mask=mask_i[:, None] & col_mask[None, :], other=0.0)
            a_j = tl.load(x_base + rows_j[:, None] + cols[None, :], mask=mask_j[:, None] & col_mask[None, :], other=0.0)
            a_gram = dot_fp32(a_i, tl.trans(a_j), a_gram)

        g_gram = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        g_base = g_ptr + b * sgb + group * p * sgc
        for c0 in range(0, p, BLOCK_P):
            ch = c0 + tl.arange(0, BLOCK_P)
            ch_mask = (ch < p)[None, :]
            g_i = tl.load(g_base + ch[None, :] * sgc + t_i[:, None] * sgt, mask=mask_i[:, None] & ch_mask, other=0.0)
            g_j = tl.load(g_base + ch[None, :] * sgc + t_j[:, None] * sgt, mask=mask_j[:, None] & ch_mask, other=0.0)
            g_gram = dot_fp32(g_i, tl.trans(g_j), g_gram)

        weight = tl.where(j > i, 2.0, 1.0)
        products = a_gram.to(tl.float64) * g_gram.to(tl.float64)  # exact, summed in float64
        tl.store(out_ptr + pid, weight * tl.sum(tl.sum(products, axis=1), axis=0))


def _block(n: int, cap: int) -> int:
    """A power-of-two tile edge ≥ 16 (tl.dot's minimum) and ≤ cap, no larger than n needs."""
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _as_3d(values):
    """Sizes of a 1d/2d/3d conv as 3d, unit dims in front."""
    return (1,) * (3 - len(values)) + tuple(values)


def _launch_args(x, g, kernel_size, stride, dilation, groups):
    """Common kernel arguments: the 3d view of x and g [B, C_out, T], sizes, strides, geometry."""
    _check_geometry(x, g, kernel_size, stride, dilation, groups)
    check_device(x, g)
    ndim = len(kernel_size)
    x5 = x.reshape(x.shape[0], x.shape[1], *(1,) * (3 - ndim), *x.shape[2:])
    out_sizes = _as_3d(g.shape[2:])
    g3 = g.reshape(g.shape[0], g.shape[1], -1)
    T = g3.shape[2]
    C_g = x.shape[1] // groups
    d, p = C_g * math.prod(kernel_size), g.shape[1] // groups
    kd, kh, kw = _as_3d(kernel_size)
    tensors = (x5, g3)
    scalars = (T, d, p, groups, C_g, *x5.stride(), *g3.stride(), *_as_3d(stride), *_as_3d(dilation))
    shape = dict(OUT_H=out_sizes[1], OUT_W=out_sizes[2], KD=kd, KH=kh, KW=kw)
    return tensors, scalars, shape, (T, d, p)


def _check_geometry(x, g, kernel_size, stride, dilation, groups):
    ndim = len(kernel_size)
    if not 1 <= ndim <= 3 or len(stride) != ndim or len(dilation) != ndim:
        raise ValueError(f"kernel_size, stride and dilation need one int per spatial dim (1 to 3), got "
                         f"{tuple(kernel_size)}, {tuple(stride)}, {tuple(dilation)}")
    if x.dim() != ndim + 2 or g.dim() != ndim + 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"x and g must be [B, C, *spatial] with {ndim} spatial dims and one batch size, "
                         f"got {tuple(x.shape)} and {tuple(g.shape)}")
    if groups < 1 or x.shape[1] % groups or g.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide C_in={x.shape[1]} and C_out={g.shape[1]}")
    for size, k, s, dil, out in zip(x.shape[2:], kernel_size, stride, dilation, g.shape[2:]):
        if out > 0 and (out - 1) * s + (k - 1) * dil >= size:
            raise ValueError(f"g's spatial shape {tuple(g.shape[2:])} does not fit the padded input "
                             f"{tuple(x.shape[2:])}; pass the already padded input as x")


@reference_unless_handled(_ops.conv_weight_norm_sq, 0, 1)  # empty, float64 or mixed dtypes: the reference
def conv_weight_norm_sq(x, g, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Triton ``conv_weight_norm_sq``: upper bounds, float64 [B], ghost or direct as the reference chooses."""
    d = x.shape[1] // groups * math.prod(kernel_size)
    method = choose_linear_norm_method(x.shape[0], math.prod(g.shape[2:]), d, g.shape[1] // groups)
    norm_sq = ghost_norm_sq if method == "ghost" else direct_norm_sq
    return norm_sq(x, g, kernel_size, stride, dilation, groups)


def ghost_norm_sq(x, g, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Upper bounds of the per-sample squared norms by the Gram form, whatever the shape (float32 [B]):
    the kernel's value plus the Grams' rounding bound in terms of the patches' term mass."""
    tensors, scalars, shape, (T, d, p) = _launch_args(x, g, kernel_size, stride, dilation, groups)
    block_t = _block(T, MAX_BLOCK_T)
    tiles = triton.cdiv(T, block_t) ** 2
    partial = torch.zeros(x.shape[0] * groups * tiles, dtype=torch.float64, device=x.device)
    _conv_ghost_kernel[(partial.numel(),)](
        *tensors, partial, *scalars, **shape,
        BLOCK_T=block_t, BLOCK_K=_block(d, MAX_BLOCK_PK), BLOCK_P=_block(p, MAX_BLOCK_PK),
    )
    return rounding.ghost_norm_sq_upper(
        partial.view(x.shape[0], -1).sum(1), rounding.conv_term_mass(x, g, kernel_size, stride, dilation, groups),
        dot_fp32_error(d, x.dtype), dot_fp32_error(p, g.dtype), rounding.gamma(T * T, rounding.UNIT_ROUNDOFF[torch.float64]),
    )


def direct_norm_sq(x, g, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Upper bounds of the per-sample squared norms by forming G tile by tile on chip, whatever the shape
    (float32 [B]): ``(‖G̃‖ + error · term mass)²`` over all groups (Minkowski)."""
    tensors, scalars, shape, (T, d, p) = _launch_args(x, g, kernel_size, stride, dilation, groups)
    block_p, block_k = _block(p, MAX_BLOCK_PK), _block(d, MAX_BLOCK_PK)
    tiles = triton.cdiv(p, block_p) * triton.cdiv(d, block_k)
    partial = torch.empty(x.shape[0] * groups * tiles, dtype=torch.float64, device=x.device)
    _conv_direct_kernel[(partial.numel(),)](
        *tensors, partial, *scalars, **shape,
        STORE_GRAD=False, BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_T=_block(T, MAX_BLOCK_T),
    )
    return rounding.direct_norm_sq_upper(
        partial.view(x.shape[0], -1).sum(1), rounding.conv_term_mass(x, g, kernel_size, stride, dilation, groups),
        dot_fp32_error(T, x.dtype), rounding.gamma(groups * p * d, rounding.UNIT_ROUNDOFF[torch.float64]),
    )


@reference_unless_handled(_ops.conv_weight_grad_sample, 0, 1)
def conv_weight_grad_sample(x, g, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Triton ``conv_weight_grad_sample``: [B, C_out, C_in/groups, *kernel_size] in the input dtype."""
    tensors, scalars, shape, (T, d, p) = _launch_args(x, g, kernel_size, stride, dilation, groups)
    batch = x.shape[0]
    out = torch.empty(batch, g.shape[1], x.shape[1] // groups, *kernel_size, dtype=x.dtype, device=x.device)
    block_p, block_k = _block(p, MAX_BLOCK_PK), _block(d, MAX_BLOCK_PK)
    tiles = triton.cdiv(p, block_p) * triton.cdiv(d, block_k)
    _conv_direct_kernel[(batch * groups * tiles,)](
        *tensors, out, *scalars, **shape,
        STORE_GRAD=True, BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_T=_block(T, MAX_BLOCK_T),
    )
    return out


register_impl("conv_weight_norm_sq", "triton", conv_weight_norm_sq)
register_impl("conv_weight_grad_sample", "triton", conv_weight_grad_sample)
