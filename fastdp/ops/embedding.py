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

from . import op
from .linear import batch_chunks


def _accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


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


@op("embedding_norm_sq")
def embedding_norm_sq(
    ids: torch.Tensor,
    sample_of_token: torch.Tensor,
    token_grads: torch.Tensor,
    batch_size: int,
    num_embeddings: int,
    padding_idx: int,
) -> torch.Tensor:
    """Each sample's squared weight-gradient norm, ``[batch_size]``."""
    order, segment, _, segment_keys = key_segments(sample_of_token * num_embeddings + ids)
    dtype = _accumulation_dtype(token_grads)
    row_grads = token_grads.new_zeros((ids.numel(), token_grads.shape[1]), dtype=dtype)
    row_grads.index_add_(0, segment, token_grads[order].to(dtype))
    row_norm_sq = row_grads.pow(2).sum(1)  # empty segments: 0
    if padding_idx >= 0:
        row_norm_sq.masked_fill_(segment_keys % num_embeddings == padding_idx, 0)
    norm_sq = torch.zeros(batch_size, dtype=dtype, device=token_grads.device)
    return norm_sq.index_add_(0, segment_keys // num_embeddings, row_norm_sq).float()


@op("embedding_clipped_grad")
def embedding_clipped_grad(
    ids: torch.Tensor,
    sample_of_token: torch.Tensor,
    token_grads: torch.Tensor,
    clip_factors: torch.Tensor,
    num_embeddings: int,
    padding_idx: int,
) -> torch.Tensor:
    """``sum_i clip_factors[i] * grad_i`` as a dense ``[num_embeddings, dim]`` weight gradient."""
    dtype = _accumulation_dtype(token_grads)
    scaled = token_grads.to(dtype) * clip_factors.to(dtype)[sample_of_token].unsqueeze(1)
    grad = token_grads.new_zeros((num_embeddings, token_grads.shape[1]), dtype=dtype)
    grad.index_add_(0, ids, scaled)
    if padding_idx >= 0:
        grad[padding_idx] = 0
    return grad


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
    dtype = _accumulation_dtype(token_grads)
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


def embedding_linear_cross_inner(
    ids: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor
) -> torch.Tensor:
    """Per-sample <sum_t onehot(ids_t) ⊗ y1_t, sum_s x2_s ⊗ y2_s> for ids: [B, T1] (int), y1: [B, T1, d],
    x2: [B, T2, V], y2: [B, T2, d]: [B] in float32 (float64 for float64)."""
    B, T1 = ids.shape
    T2 = x2.shape[1]
    dtype = torch.promote_types(torch.promote_types(y1.dtype, y2.dtype), torch.promote_types(x2.dtype, torch.float32))
    out = torch.empty(B, dtype=dtype, device=y1.device)
    for rows in batch_chunks(B, 3 * T1 * T2):
        # x2[i, s, ids[i, t]] for every (s, t): [chunk, T2, T1]
        index = ids[rows].long().unsqueeze(1).expand(-1, T2, -1)
        x_gram = torch.gather(x2[rows], 2, index).to(dtype)
        y_gram = torch.bmm(y2[rows].to(dtype), y1[rows].to(dtype).mT)
        out[rows] = (x_gram * y_gram).sum((1, 2))
    return out


def embedding_cross_inner(ids1: torch.Tensor, y1: torch.Tensor, ids2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """Per-sample <sum_t onehot(ids1_t) ⊗ y1_t, sum_s onehot(ids2_s) ⊗ y2_s> (two lookups of one table):
    sum over token pairs with equal ids of y1_t · y2_s, [B]."""
    B, T1 = ids1.shape
    T2 = ids2.shape[1]
    dtype = torch.promote_types(torch.promote_types(y1.dtype, y2.dtype), torch.float32)
    out = torch.empty(B, dtype=dtype, device=y1.device)
    for rows in batch_chunks(B, 3 * T1 * T2):
        same = ids1[rows].unsqueeze(2) == ids2[rows].unsqueeze(1)  # [chunk, T1, T2]
        y_gram = torch.bmm(y1[rows].to(dtype), y2[rows].to(dtype).mT)
        out[rows] = (y_gram * same).sum((1, 2))
    return out
