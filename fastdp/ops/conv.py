"""Per-sample ops for N-d convolutions (1d/2d/3d) on an already padded input.

Norms and per-sample gradients use the unfold view: a convolution is, per group, a
linear layer over T = output positions with d = (C_in/groups)·prod(kernel) inputs and
p = C_out/groups outputs, so they reuse fastdp.ops.linear (cost model included) with
the groups folded into the batch. The clipped gradient needs no unfold at all: it is
the ordinary weight gradient of the clip-scaled output gradient, which cuDNN/oneDNN
computes without materialising the [B, T, d] patches.

x: padded input [B, C_in, *S]; g: output gradient [B, C_out, *L]; kernel_size,
stride, dilation: one int per spatial dim.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import op, rounding
from .linear import CHUNK_NUMEL, batch_chunks, linear_weight_norm_sq

#: a weight gradient up to this many elements (1 MiB of float32) is returned whole by the in-place clipped sum;
#: also the least scratch a chunk of norm patches may take
MIN_BLOCKED_WEIGHT_NUMEL = 1 << 18


def unfold(
    x: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int], stride: Sequence[int], groups: int = 1
) -> torch.Tensor:
    """N-d im2col without padding: [B, groups, L, (C/groups)·prod(kernel_size)].

    For groups=1 this is ``F.unfold(x).transpose(1, 2)`` generalised to any number of
    spatial dims; feature order within a row is (channel, *kernel offsets), matching
    the conv weight layout [C_out, C_in/groups, *kernel_size].
    """
    batch, channels = x.shape[:2]
    ndim = len(kernel_size)
    patches = x
    for dim, (size, dil, step) in enumerate(zip(kernel_size, dilation, stride)):
        patches = patches.unfold(2 + dim, dil * (size - 1) + 1, step)  # window dim appended
    patches = patches[(slice(None),) * (2 + ndim) + tuple(slice(None, None, dil) for dil in dilation)]
    out_positions = patches.shape[2 : 2 + ndim]
    patches = patches.reshape(batch, groups, channels // groups, *out_positions, *kernel_size)
    # [B, G, C_g, *L, *k] -> [B, G, *L, C_g, *k]
    order = (0, 1, *range(3, 3 + ndim), 2, *range(3 + ndim, 3 + 2 * ndim))
    row_width = channels // groups * math.prod(kernel_size)
    return patches.permute(order).reshape(batch, groups, math.prod(out_positions), row_width)


def _grouped_sequence_view(x, g, kernel_size, stride, dilation, groups):
    """(a [B·G, T, d], g [B·G, T, p]): each (sample, group) as one linear-layer sample."""
    batch, out_channels = g.shape[:2]
    a = unfold(x, kernel_size, dilation, stride, groups)
    positions = a.shape[2]
    g = g.reshape(batch, groups, out_channels // groups, positions).transpose(2, 3)
    return a.flatten(0, 1), g.flatten(0, 1)


@op("conv_weight_norm_sq")
def conv_weight_norm_sq(x, g, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Upper bounds of the per-sample squared weight-gradient norms, float64 [B] (sum over groups of the
    linear ops' bounds), a chunk of samples at a time."""
    batch = x.shape[0]
    patch_numel = math.prod(g.shape[2:]) * x.shape[1] * math.prod(kernel_size)
    out = torch.empty(batch, dtype=torch.float64, device=x.device)
    # patches a chunk of samples at a time, no larger than the input itself (k^d times fewer samples)
    for rows in batch_chunks(batch, patch_numel, max(MIN_BLOCKED_WEIGHT_NUMEL, min(x.numel(), CHUNK_NUMEL))):
        a, g_rows = _grouped_sequence_view(x[rows], g[rows], kernel_size, stride, dilation, groups)
        out[rows] = linear_weight_norm_sq(a, g_rows).view(-1, groups).sum(1)
        del a, g_rows  # before the next chunk's patches exist
    return out * rounding.BOUND_ARITHMETIC


@op("conv_weight_clipped_grad")
def conv_weight_clipped_grad(x, g, c, kernel_size, stride, dilation, groups: int, weight=None, padding=None) -> torch.Tensor:
    """sum_i c_i grad_i for the weight [C_out, C_in/groups, *kernel_size], as one conv weight-gradient.

    ``weight``: the layer's weight, whose shape the call reads (the weight-gradient call makes any stand-in
    contiguous, a weight-sized copy); used when it has g's dtype and device. ``padding``: x is to be
    zero-padded by that much per spatial dim, both sides, which the call does itself (no padded copy)."""
    ndim = len(kernel_size)
    scaled = g * c.to(g.dtype).view(-1, *(1,) * (g.dim() - 1))
    weight_shape = (g.shape[1], x.shape[1] // groups, *kernel_size)
    if weight is None or weight.dtype != g.dtype or weight.device != g.device or not weight.is_contiguous():
        weight = scaled.new_empty(1).expand(weight_shape)  # only its shape and dtype are read
    weight = weight.detach()
    zeros = [0] * ndim
    padding = zeros if padding is None else list(padding)
    return torch.ops.aten.convolution_backward(
        scaled, x, weight, None, list(stride), padding, list(dilation), False, zeros, groups, (False, True, False)
    )[1]


def add_conv_weight_clipped_grad(out, x, g, c, kernel_size, stride, dilation, groups: int, weight=None, padding=None):
    """``out += conv_weight_clipped_grad(...)`` in place, a block of output channels at a time when the weight
    is large and ``groups == 1`` (at most a quarter of it returned at once, beside ``out``). Each block is
    the same weight-gradient reduction over samples and positions for its channels."""
    channels = g.shape[1]
    step = channels if groups != 1 or out.numel() <= MIN_BLOCKED_WEIGHT_NUMEL else -(-channels // 4)
    for start in range(0, channels, step):
        rows = slice(start, start + step)
        block_weight = None if weight is None else weight[rows]
        out[rows].add_(
            conv_weight_clipped_grad(x, g[:, rows], c, kernel_size, stride, dilation, groups, block_weight, padding)
        )


@op("conv_weight_grad_sample")
def conv_weight_grad_sample(x, g, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Per-sample weight gradients [B, C_out, C_in/groups, *kernel_size], with no unfold and no copy of x.

    The samples side by side as groups: x [B, C_in, *S] viewed as one sample [1, B·C_in, *S], g as
    [1, B·C_out, *L], the layer as a convolution with B·groups groups: its weight gradient
    [B·C_out, C_in/groups, *k] is each (sample, group)'s own, one oneDNN/cuDNN weight-gradient call.
    """
    return conv_weight_grad_sample_zero_padded(x, g, kernel_size, stride, dilation, groups, [0] * len(kernel_size))


def conv_weight_grad_sample_zero_padded(x, g, kernel_size, stride, dilation, groups: int, padding) -> torch.Tensor:
    """``conv_weight_grad_sample`` of the input ``x`` zero-padded by ``padding`` (per spatial dim, both sides),
    which the weight-gradient call pads itself: no padded copy of x (the torch path of the conv rule)."""
    batch, in_channels = x.shape[:2]
    out_channels = g.shape[1]
    if batch == 0:
        return g.new_zeros(0, out_channels, in_channels // groups, *kernel_size)
    zeros = [0] * len(kernel_size)
    weight = g.new_empty(1).expand(batch * out_channels, in_channels // groups, *kernel_size)  # shape only
    grads = torch.ops.aten.convolution_backward(
        g.reshape(1, batch * out_channels, *g.shape[2:]), x.reshape(1, batch * in_channels, *x.shape[2:]), weight,
        None, list(stride), list(padding), list(dilation), False, zeros, batch * groups, (False, True, False),
    )[1]
    return grads.view(batch, out_channels, in_channels // groups, *kernel_size)
