"""Embedding-lookup ops on a token list: per-sample norms, clipped sums, per-sample grads.

nn.Embedding and nn.EmbeddingBag both reduce to a *token list* of N looked-up tokens:
``ids [N]`` (int64 row indices), ``sample_of_token [N]`` (int64, which sample each token
belongs to) and ``token_grads [N, dim]`` (the gradient flowing into that token's weight
row). A sample's gradient for row v is the sum of its tokens' grads with id v, so a token
repeated within a sample contributes the norm of the *sum* of its grads. Tokens are grouped
by the key ``sample * num_embeddings + id`` with a sort and segment-summed (``index_add``):
O(N·dim) work and memory, never a [B, num_embeddings] one-hot. The segments come from
``key_segments``, whose outputs have sizes fixed by N (not by the number of distinct keys, as
``torch.unique``'s would): no host synchronisation, so a DP step can be captured in a CUDA graph.

``padding_idx`` (-1 for none) names the row torch never updates; its tokens are dropped.
All results accumulate in float32 (float64 for float64 grads).
"""

from __future__ import annotations

import torch

from . import op, rounding
from .linear import batch_chunks


def token_mass(sample_of_token: torch.Tensor, token_grads: torch.Tensor, batch_size: int, ids=None, padding_idx=-1):
    """Per sample: an upper bound of its term mass ``Σ_t ‖g_t‖`` (a lookup's one-hot input has norm 1)
    over the tokens that reach the weight (not those of ``padding_idx``), and its number of tokens,
    both float64 [batch_size] (``fastdp.ops.rounding``)."""
    norms = rounding.row_norms_upper(token_grads, dim=1)
    if padding_idx >= 0:
        norms = norms.masked_fill(ids == padding_idx, 0)
    mass = norms.new_zeros(batch_size).index_add_(0, sample_of_token, norms)
    counts = norms.new_zeros(batch_size).index_add_(0, sample_of_token, torch.ones_like(norms))
    unit = rounding.UNIT_ROUNDOFF[torch.float64]
    return mass * (1 + counts * unit / (1 - counts * unit)), counts


def segment_sum_error(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """γ_n per sample for sums of at most ``counts`` tokens (plus a few tree levels) in ``dtype``."""
    nu = (counts + 8) * rounding.UNIT_ROUNDOFF[dtype]
    return nu / (1 - nu)


def embedding_norm_sq_upper(
    value: torch.Tensor, ids: torch.Tensor, sample_of_token: torch.Tensor, token_grads: torch.Tensor, batch_size: int,
    padding_idx: int, dtype: torch.dtype, square_sum_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Bound the exact per-sample ``‖G_i‖²`` from ``value`` (float64), the computed sum of the squared
    segment sums: each segment sum (in ``dtype``) is within γ_count Σ|g_t| of exact, and the squares,
    summed in ``square_sum_dtype``, within γ(dim + tokens) relative. Float64 [B]."""
    mass, counts = token_mass(sample_of_token, token_grads, batch_size, ids, padding_idx)
    value = value * (1 + segment_sum_error(counts + token_grads.shape[1], square_sum_dtype))
    return rounding.direct_norm_sq_upper(value, mass, segment_sum_error(counts, dtype), 0.0)


def key_segments(keys: torch.Tensor):
    """Group tokens with equal keys, with every output sized by N = keys.numel() (no host sync).

    Returns ``order`` [N] (token indices sorted by key, stable), ``segment`` [N] (the segment of
    each sorted position), ``offsets`` [N + 1] (segment s is sorted positions
    ``offsets[s]:offsets[s + 1]``) and ``segment_keys`` [N]. There are as many real segments as
    distinct keys, first, in key order; the rest are empty (offsets N) and carry the largest key,
    so ``segment_keys`` stays sorted. Whoever writes a row per segment must skip the empty ones.
    """
    n = keys.numel()
    sorted_keys, order = torch.sort(keys, stable=True)
    starts_segment = torch.ones(n, dtype=torch.bool, device=keys.device)
    starts_segment[1:] = sorted_keys[1:] != sorted_keys[:-1]
    segment = starts_segment.cumsum(0) - 1
    ends = torch.full((n,), n, dtype=torch.long, device=keys.device)
    ends.scatter_reduce_(0, segment, torch.arange(1, n + 1, device=keys.device), "amax", include_self=False)
    offsets = torch.cat([ends.new_zeros(1), ends])
    segment_keys = sorted_keys[offsets[:-1].clamp(max=max(n - 1, 0))]
    return order, segment, offsets, segment_keys


def sample_row_sums(ids: torch.Tensor, sample_of_token: torch.Tensor, token_grads: torch.Tensor, num_embeddings: int):
    """Each sample's nonzero gradient rows: the sums of its tokens' grads per id, ``[N, dim]`` in float32
    (float64 for float64; rows past the distinct (sample, id) pairs are 0), and each row's key
    ``sample · num_embeddings + id`` ``[N]`` (``key_segments``)."""
    order, segment, _, segment_keys = key_segments(sample_of_token * num_embeddings + ids)
    dtype = rounding.accumulation_dtype(token_grads)
    row_grads = token_grads.new_zeros((ids.numel(), token_grads.shape[1]), dtype=dtype)
    # each token's segment, in token order: no sorted [N, dim] copy of the token gradients (the stable sort
    # keeps a segment's tokens in token order, so the sums are added in the same order either way)
    segment_of_token = torch.empty_like(segment).scatter_(0, order, segment)
    return row_grads.index_add_(0, segment_of_token, token_grads.to(dtype)), segment_keys


@op("embedding_norm_sq")
def embedding_norm_sq(
    ids: torch.Tensor,
    sample_of_token: torch.Tensor,
    token_grads: torch.Tensor,
    batch_size: int,
    num_embeddings: int,
    padding_idx: int,
) -> torch.Tensor:
    """An upper bound of each sample's squared weight-gradient norm, float64 ``[batch_size]``
    (``embedding_norm_sq_upper``: cancelling tokens of one row cannot hide in rounding)."""
    row_grads, segment_keys = sample_row_sums(ids, sample_of_token, token_grads, num_embeddings)
    row_norm_sq = rounding.row_sq_sums_float64(row_grads)  # empty segments: 0
    if padding_idx >= 0:
        row_norm_sq.masked_fill_(segment_keys % num_embeddings == padding_idx, 0)
    value = torch.zeros(batch_size, dtype=torch.float64, device=token_grads.device)
    value.index_add_(0, segment_keys // num_embeddings, row_norm_sq)
    return embedding_norm_sq_upper(value, ids, sample_of_token, token_grads, batch_size, padding_idx, row_grads.dtype)


@op("embedding_clipped_grad")
def embedding_clipped_grad(
    ids: torch.Tensor,
    sample_of_token: torch.Tensor,
    token_grads: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    padding_idx: int,
) -> torch.Tensor:
    """``sum_i clip_factors[i] * grad_i`` as a dense ``[num_embeddings, dim]`` weight gradient.

    Each sample's tokens are summed per row first, so the sum over samples adds one term per
    sample and row: whatever order a device's scatter-add takes, one sample's cancelling tokens
    are never interleaved with other samples' (the clipped-sum slack of ``fastdp.ops.rounding``)."""
    grad = token_grads.new_zeros((num_embeddings, token_grads.shape[1]), dtype=rounding.accumulation_dtype(token_grads))
    add_embedding_clipped_grad(grad, ids, sample_of_token, token_grads, clip_factors, num_embeddings, padding_idx)
    return grad


def add_embedding_clipped_grad(
    out: torch.Tensor,
    ids: torch.Tensor,
    sample_of_token: torch.Tensor,
    token_grads: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    padding_idx: int,
) -> None:
    """``out += embedding_clipped_grad(...)`` in place (``out`` [num_embeddings, dim] in the row sums' dtype),
    with no dense temporary: the same per-sample row sums, scaled, scattered into ``out``; the padding row
    gets nothing from this call (``out`` may hold another use's gradient of a tied weight there)."""
    row_grads, segment_keys = sample_row_sums(ids, sample_of_token, token_grads, num_embeddings)
    row_grads *= clip_factors.to(row_grads.dtype)[segment_keys // num_embeddings].unsqueeze(1)
    rows = segment_keys % num_embeddings
    if padding_idx >= 0:
        row_grads.masked_fill_((rows == padding_idx).unsqueeze(1), 0)
    out.index_add_(0, rows, row_grads)


@op("embedding_grad_sample")
def embedding_grad_sample(
    ids: torch.Tensor,
    sample_of_token: torch.Tensor,
    token_grads: torch.Tensor,
    batch_size: int,
    num_embeddings: int,
    padding_idx: int,
) -> torch.Tensor:
    """Materialised per-sample weight gradients ``[batch_size, num_embeddings, dim]``."""
    dtype = rounding.accumulation_dtype(token_grads)
    dim = token_grads.shape[1]
    grads = token_grads.new_zeros((batch_size * num_embeddings, dim), dtype=dtype)
    grads.index_add_(0, sample_of_token * num_embeddings + ids, token_grads.to(dtype))
    grads = grads.view(batch_size, num_embeddings, dim)
    if padding_idx >= 0:
        grads[:, padding_idx] = 0
    return grads


# -- cross terms of a tied embedding weight ----------------------------------------------------
# An embedding use contributes G_i = sum_t onehot(id_t) ⊗ y_t (y_t the token's output gradient);
# against another use sum_s x_s ⊗ y'_s the inner product is sum_{t,s} (onehot(id_t)·x_s)(y_t·y'_s),
# and onehot(id_t)·x_s = x_s[id_t] is a gather (a token-equality test when x is one-hot too).
# Padding tokens are expected with y_t = 0 (the rule zeroes them): they contribute nothing.
# A gather and a batched GEMM: plain functions, not dispatched ops (see the linear cross terms).


def _cross_upper(pairs, y1: torch.Tensor, y2: torch.Tensor, mass_1: torch.Tensor, mass_2: torch.Tensor) -> torch.Tensor:
    """Upper bounds of ``Σ_{t,s} pairs(rows)[s, t] · (y2_s · y1_t)`` per sample, float64 [B]: ``pairs`` gives the
    exact first factor (a gather or a token-equality test) for a chunk of samples, [chunk, T2, T1]."""
    B, T1 = y1.shape[:2]
    T2 = y2.shape[1]
    dtype = rounding.accumulation_dtype(y1, y2)
    value = torch.empty(B, dtype=torch.float64, device=y1.device)
    with rounding.ieee_fp32():
        for rows in batch_chunks(B, 6 * T1 * T2):
            y_gram = rounding.chunked_bmm(y2[rows], y1[rows].mT, dtype)
            value[rows] = (pairs(rows).double() * y_gram.double()).sum((1, 2))
    error = (1 + rounding.chunked_dot_error(y1.shape[-1], dtype)) * (
        1 + rounding.gamma(T1 * T2, rounding.UNIT_ROUNDOFF[torch.float64])
    ) - 1
    return rounding.cross_inner_upper(value, mass_1, mass_2, error)


def embedding_linear_cross_inner(
    ids: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor
) -> torch.Tensor:
    """An upper bound of the per-sample <sum_t onehot(ids_t) ⊗ y1_t, sum_s x2_s ⊗ y2_s> for ids: [B, T1] (int),
    y1: [B, T1, d], x2: [B, T2, V], y2: [B, T2, d]: float64 [B]."""
    T2 = x2.shape[1]

    def gathered(rows):  # x2[i, s, ids[i, t]] for every (s, t): [chunk, T2, T1], exact
        return torch.gather(x2[rows], 2, ids[rows].long().unsqueeze(1).expand(-1, T2, -1))

    return _cross_upper(gathered, y1, y2, rounding.bias_term_mass(y1), rounding.term_mass(x2, y2))


def embedding_cross_inner(ids1: torch.Tensor, y1: torch.Tensor, ids2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """An upper bound of the per-sample <sum_t onehot(ids1_t) ⊗ y1_t, sum_s onehot(ids2_s) ⊗ y2_s> (two lookups
    of one table): the sum over token pairs with equal ids of y1_t · y2_s, float64 [B]."""

    def same(rows):  # [chunk, T2, T1]
        return ids2[rows].unsqueeze(2) == ids1[rows].unsqueeze(1)

    return _cross_upper(same, y1, y2, rounding.bias_term_mass(y1), rounding.bias_term_mass(y2))
