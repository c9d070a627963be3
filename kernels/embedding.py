"""Embedding-gradient ops on a token list by sort + segment sums, never a one-hot or [B, V, D] scratch.

A sample's gradient row for id v is the sum of the grads of its tokens with id v. Sorting
the tokens by a key (``sample·V + id`` for per-sample results, ``id`` for the clipped sum;
``fastdp.ops.embedding.key_segments``) makes those tokens one contiguous segment; one program
per segment (N programs: the segments past the distinct keys are empty and return at once, so
nothing waits on the host for the count) sums its rows over D in fp32 and then either keeps only the squared norm of the sum
(``embedding_norm_sq``, then a per-sample sum of segment norms) or writes the summed row
(``embedding_grad_sample``, and ``embedding_clipped_grad`` with each token weighted by its
sample's clip factor). Every output row is written by exactly one program in a fixed order,
so results are deterministic (no atomics). Tokens with id ``padding_idx`` are skipped.

The token-list conventions (ids, sample_of_token, token_grads [N, D]) are those of
fastdp.ops.embedding. float64 grads and empty token lists run the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.ops import embedding as _ops
from fastdp.ops import register_impl

from ._triton_utils import reference_unless_handled

#: Tile of the segment-sum: tokens per step and columns of D per step.
BLOCK_TOKENS = 16
MAX_BLOCK_D = 128


@triton.jit
def _segment_rows_kernel(
    grads_ptr, stride_token, order_ptr, seg_offsets_ptr, seg_keys_ptr, factors_ptr, sample_ptr, out_ptr,
    D, num_embeddings, padding_idx,
    STORE_ROWS: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For segment s (tokens order[seg_offsets[s]:seg_offsets[s+1]], all with key seg_keys[s]):
    row = sum of (factor ⊙) token grads; STORE_ROWS writes it to out[key], else out[s] = ||row||²."""
    seg = tl.program_id(0)
    start = tl.load(seg_offsets_ptr + seg)
    end = tl.load(seg_offsets_ptr + seg + 1)
    key = tl.load(seg_keys_ptr + seg)
    norm_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # empty segments carry another segment's key: they must not write its row
    if (end > start) & (key % num_embeddings != padding_idx):  # padding_idx = -1 (none) never matches
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            row = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                in_segment = n < end
                token = tl.load(order_ptr + n, mask=in_segment, other=0)
                tile = tl.load(
                    grads_ptr + token[:, None] * stride_token + cols[None, :],
                    mask=in_segment[:, None] & (cols < D)[None, :], other=0.0,
                ).to(tl.float32)
                if SCALED:
                    sample = tl.load(sample_ptr + token, mask=in_segment, other=0)
                    tile = tile * tl.load(factors_ptr + sample, mask=in_segment, other=0.0).to(tl.float32)[:, None]
                row += tl.sum(tile, axis=0)
            if STORE_ROWS:
                tl.store(out_ptr + key * D + cols, row, mask=cols < D)
            else:
                norm_sq += row * row
    if not STORE_ROWS:
        tl.store(out_ptr + seg, tl.sum(norm_sq, axis=0))


@triton.jit
def _range_sums_kernel(values_ptr, offsets_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[i] = sum(values[offsets[i]:offsets[i+1]]), in order."""
    i = tl.program_id(0)
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        total += tl.load(values_ptr + n, mask=n < end, other=0.0)
    tl.store(out_ptr + i, tl.sum(total, axis=0))


def _check_tokens(ids, sample_of_token, token_grads, num_embeddings, batch_size=None):
    """Kernels index memory with these, so bad values must fail here rather than corrupt memory.

    The value checks read the ids on the host; while a CUDA graph is captured they cannot, and are
    left out: the engine's ids were already checked by the forward's lookup, and sample_of_token
    is its own arange."""
    if token_grads.dim() != 2 or ids.shape != (token_grads.shape[0],) or sample_of_token.shape != ids.shape:
        raise ValueError(f"need ids [N], sample_of_token [N] and token_grads [N, D]; got {tuple(ids.shape)}, "
                         f"{tuple(sample_of_token.shape)} and {tuple(token_grads.shape)}")
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = torch.aminmax(ids)
    if low < 0 or high >= num_embeddings:
        raise ValueError(f"ids must lie in [0, num_embeddings={num_embeddings}); got ids in [{low}, {high}]")
    if batch_size is not None:
        low, high = torch.aminmax(sample_of_token)
        if low < 0 or high >= batch_size:
            raise ValueError(f"sample_of_token must lie in [0, batch_size={batch_size}); got [{low}, {high}]")


def _segments(keys: torch.Tensor):
    """Token order sorted by key, and per segment (N of them, the real ones first): key and [start, end) offsets."""
    order, _, offsets, segment_keys = _ops.key_segments(keys)
    return order, segment_keys, offsets


def _segment_rows(token_grads, order, seg_keys, seg_offsets, out, num_embeddings, padding_idx, store_rows,
                  factors=None, sample_of_token=None):
    """Launch one program per segment; with ``factors``, token j is weighted by factors[sample_of_token[j]]."""
    D = token_grads.shape[1]
    grads = token_grads if token_grads.stride(1) == 1 else token_grads.contiguous()
    scaled = factors is not None
    _segment_rows_kernel[(seg_keys.numel(),)](
        grads, grads.stride(0), order, seg_offsets, seg_keys,
        factors if scaled else grads, sample_of_token if scaled else order, out,
        D, num_embeddings, padding_idx,
        STORE_ROWS=store_rows, SCALED=scaled, BLOCK_N=BLOCK_TOKENS,
        BLOCK_D=min(MAX_BLOCK_D, triton.next_power_of_2(D)),
    )
    return out


@reference_unless_handled(_ops.embedding_norm_sq, 2)  # no tokens, or float64: the reference
def embedding_norm_sq(ids, sample_of_token, token_grads, batch_size: int, num_embeddings: int, padding_idx: int):
    """Triton ``embedding_norm_sq``: upper bounds (``fastdp.ops.embedding.embedding_norm_sq_upper``), float64 [batch_size]."""
    ids, sample_of_token = ids.long(), sample_of_token.long()
    _check_tokens(ids, sample_of_token, token_grads, num_embeddings, batch_size)
    out = torch.zeros(batch_size, dtype=torch.float32, device=token_grads.device)
    order, seg_keys, seg_offsets = _segments(sample_of_token * num_embeddings + ids)
    seg_norm_sq = torch.empty(seg_keys.numel(), dtype=torch.float32, device=out.device)
    _segment_rows(token_grads, order, seg_keys, seg_offsets, seg_norm_sq, num_embeddings, padding_idx, False)
    # segments are sorted by sample: sample b owns segments [sample_offsets[b], sample_offsets[b+1])
    # (the empty segments at the end carry the last key, so they fall to the last sample, adding 0)
    samples = torch.arange(batch_size + 1, device=out.device, dtype=seg_keys.dtype)
    sample_offsets = torch.searchsorted(seg_keys // num_embeddings, samples)
    _range_sums_kernel[(batch_size,)](seg_norm_sq, sample_offsets, out, BLOCK=BLOCK_TOKENS)
    return _ops.embedding_norm_sq_upper(out.double(), ids, sample_of_token, token_grads, batch_size, padding_idx,
                                        torch.float32, square_sum_dtype=torch.float32)


@reference_unless_handled(_ops.embedding_clipped_grad, 2)
def embedding_clipped_grad(ids, sample_of_token, token_grads, clip_factors, num_embeddings: int, padding_idx: int):
    """Triton ``embedding_clipped_grad``: dense [num_embeddings, D] float32, sum_i c_i grad_i."""
    ids, sample_of_token = ids.long(), sample_of_token.long()
    _check_tokens(ids, sample_of_token, token_grads, num_embeddings, clip_factors.numel())
    out = torch.zeros(num_embeddings, token_grads.shape[1], dtype=torch.float32, device=token_grads.device)
    order, seg_keys, seg_offsets = _segments(ids)
    factors = clip_factors.to(torch.float32).contiguous()
    return _segment_rows(token_grads, order, seg_keys, seg_offsets, out, num_embeddings, padding_idx, True,
                         factors, sample_of_token.contiguous())


@reference_unless_handled(_ops.embedding_grad_sample, 2)
def embedding_grad_sample(ids, sample_of_token, token_grads, batch_size: int, num_embeddings: int, padding_idx: int):
    """Triton ``embedding_grad_sample``: [batch_size, num_embeddings, D] float32 (the output itself is dense)."""
    ids, sample_of_token = ids.long(), sample_of_token.long()
    _check_tokens(ids, sample_of_token, token_grads, num_embeddings, batch_size)
    D = token_grads.shape[1]
    out = torch.zeros(batch_size, num_embeddings, D, dtype=torch.float32, device=token_grads.device)
    order, seg_keys, seg_offsets = _segments(sample_of_token * num_embeddings + ids)
    _segment_rows(token_grads, order, seg_keys, seg_offsets, out, num_embeddings, padding_idx, True)
    return out


register_impl("embedding_norm_sq", "triton", embedding_norm_sq)
register_impl("embedding_clipped_grad", "triton", embedding_clipped_grad)
register_impl("embedding_grad_sample", "triton", embedding_grad_sample)
