"""EmbeddingBag ops: one bag's weight gradient is rank one, so no token gradients are ever formed.

Every token t of bag i receives the bag's output gradient ``g_i`` times its weight ``w_t`` in the bag
(``per_sample_weights`` in sum mode, 1 / the bag's size in mean mode, 0 for a token the forward leaves
out), so sample i's weight gradient is ``G_i = Σ_v e_v ⊗ c_iv g_i`` with the coefficient
``c_iv = Σ_{t in i, id_t = v} w_t``:

- its norm is ``‖c_i‖ ‖g_i‖`` (a ghost norm from per-token scalars);
- the clipped sum adds, per (sample, row), the one row ``f_i c_iv g_i``: what non-private training's
  backward scatters, scaled.

Only scalars per token are kept ([N]: the sorted keys ``sample · num_embeddings + id`` and the
coefficients) and the rows are formed a chunk at a time; the token-list ops of ``fastdp.ops.embedding``
would hold the token gradients and their row sums, two [N, dim] tensors.

Rounding (``fastdp.ops.rounding``): the coefficients are summed in float64, a sample's tokens of one row
before anything else, so weights that cancel leave no rounding behind to be summed with other samples'
rows; a row is ``fl(fl(f_i c_iv) g_i)`` in the accumulation dtype, within 3 roundings of exact. All
sizes are fixed by N and the batch (no host synchronisation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import rounding

#: the rows of a clipped sum are formed this many elements at a time at least (256 KiB in float32) ...
MIN_ROWS_CHUNK_NUMEL = 1 << 16
#: ... and otherwise a 1/32 of the gradient, or a 1/16 of the rows, whichever is larger (few chunks)
ROWS_CHUNKS_OF_GRAD = 32
MAX_ROWS_CHUNKS = 16


class BagCoefficients(NamedTuple):
    """The nonzero structure of a batch's per-sample gradients ``G_i = Σ_v e_v ⊗ c_iv g_i``."""

    keys: torch.Tensor  # [N] int64, sorted: sample · num_embeddings + id
    coefficients: torch.Tensor  # [N] float64: c_iv at the first position of each key, 0 at the others
    mass: torch.Tensor  # [B] float64: Σ_t |w_t| per sample, an upper bound (≥ ‖c_i‖_1 ≥ ‖c_i‖)
    counts: torch.Tensor  # [B] float64: tokens per sample


def bag_coefficients(
    ids: torch.Tensor, sample_of_token: torch.Tensor, token_weights: torch.Tensor, batch_size: int, num_embeddings: int
) -> BagCoefficients:
    """Sum the token weights of each (sample, row) in float64: ids, sample_of_token [N] int64, token_weights [N]."""
    n = ids.numel()
    weights = token_weights.double()
    unit = rounding.UNIT_ROUNDOFF[torch.float64]
    counts = weights.new_zeros(batch_size).index_add_(0, sample_of_token, torch.ones_like(weights))
    mass = weights.new_zeros(batch_size).index_add_(0, sample_of_token, weights.abs())
    mass = mass * (1 + rounding.gamma(counts, unit))
    keys, order = torch.sort(sample_of_token * num_embeddings + ids, stable=True)
    weights = weights[order]
    del order
    first = torch.ones(n, dtype=torch.bool, device=ids.device)
    first[1:] = keys[1:] != keys[:-1]
    segment = first.cumsum(0).sub_(1)  # of each sorted position
    sums = torch.zeros_like(weights).index_add_(0, segment, weights)
    del weights
    coefficients = torch.where(first, sums[segment], 0.0)  # each key's sum at its first position
    return BagCoefficients(keys, coefficients, mass, counts)


def bag_norm_sq(bag: BagCoefficients, grad_output: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Upper bounds of each sample's ``‖G_i‖²``, float64 [B], which also bound ``‖ĉ_i‖²‖g_i‖²`` of the computed
    coefficients ĉ: their float64 sums of squares (γ over tokens and dim), plus ĉ's own rounding, within
    γ_count Σ_t |w_t| of exact per row (``direct_norm_sq_upper``)."""
    batch_size = grad_output.shape[0]
    coefficient_sq = bag.coefficients.new_zeros(batch_size).index_add_(
        0, torch.div(bag.keys, num_embeddings, rounding_mode="floor"), bag.coefficients.square()
    )
    grad_sq = rounding.row_sq_sums_float64(grad_output.flatten(1))
    unit = rounding.UNIT_ROUNDOFF[torch.float64]
    sum_error = rounding.gamma(bag.counts + grad_output.shape[-1] + 4, unit)
    term_mass = bag.mass * grad_sq.sqrt() * (1 + sum_error)  # ≥ Σ_t |w_t| ‖g_i‖
    return rounding.direct_norm_sq_upper(coefficient_sq * grad_sq, term_mass, rounding.gamma(bag.counts, unit), sum_error)


def bag_clipped_sum_error(dtype: torch.dtype) -> float:
    """κ, relative to ``f_i ‖ĉ_i‖ ‖g_i‖`` (≤ f_i times the norm bound): each row ``fl(fl(f_i ĉ_iv) g_i)`` in
    ``dtype`` (f·ĉ in float64, rounded to ``dtype``, then times g) is within 3 roundings of ``f_i ĉ_iv g_i``,
    element by element, so the sample's rows are within κ f_i ‖ĉ_i‖‖g_i‖ of ``f_i ĉ_i ⊗ g_i``. Relative to
    the norm, not to the weights' mass: cancelling weights were summed exactly enough before."""
    return rounding.gamma(3, rounding.UNIT_ROUNDOFF[dtype])


def add_bag_clipped_grad(
    out: torch.Tensor, bag: BagCoefficients, grad_output: torch.Tensor, clip_factors: torch.Tensor,
    num_embeddings: int,
) -> None:
    """``out += Σ_i f_i G_i`` in place (``out`` [num_embeddings, dim], float32 or float64): one row per
    (sample, row) and per position of ``bag.keys`` (0 where a key repeats), a chunk of rows at a time.
    A sample with ``f_i = 0`` adds zeros even where its coefficients are not finite; its ``g_i`` must be
    finite (the engine zeroes the output gradients of the samples it drops). Where ``f_i c_iv`` overflows
    ``out``'s dtype (huge weights, ``g_i`` tiny or 0) it is clamped to the largest finite value: the row is
    smaller than ``f_i c_iv g_i``, never larger, and never inf or NaN."""
    n, dim = bag.keys.numel(), out.shape[1]
    g = grad_output.reshape(grad_output.shape[0], dim).to(out.dtype)
    factors = clip_factors.to(device=out.device, dtype=torch.float64)
    chunk_numel = max(MIN_ROWS_CHUNK_NUMEL, out.numel() // ROWS_CHUNKS_OF_GRAD, math.ceil(n / MAX_ROWS_CHUNKS) * dim)
    step = max(1, chunk_numel // max(dim, 1))
    largest = torch.finfo(out.dtype).max
    for start in range(0, n, step):
        keys = bag.keys[start : start + step]
        sample = torch.div(keys, num_embeddings, rounding_mode="floor")
        sample_factors = factors[sample]
        scale = (sample_factors * bag.coefficients[start : start + step]).masked_fill_(sample_factors == 0, 0)
        scale = scale.clamp_(-largest, largest).to(out.dtype)  # |f c| above it: g_i is tiny, the row smaller
        rows = g[sample].mul_(scale.unsqueeze(1))
        out.index_add_(0, keys - sample * num_embeddings, rows)
        del keys, sample, sample_factors, scale, rows
