"""Per-sample squared weight-gradient norms of a linear-type layer by the ghost (Gram) method.

||g_iᵀ a_i||²_F = Σ_{t,s} (a_t·a_s)(g_t·g_s). A program takes one (t-block, s-block) pair of
one sample, accumulates both Gram tiles (over d for a, over p for g) in registers, and
writes Σ of their elementwise product: the T×T Gram matrices never reach memory. Both
Grams are symmetric, so only blocks with s-block ≥ t-block do work, off-diagonal ones
counted twice; the lower-triangle programs run an empty loop and write zero.

T = 1 (an MLP layer) is the Goodfellow product ||a_i||²·||g_i||², a plain reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.ops import linear as _ops
from fastdp.ops import register_impl, rounding

from ._triton_utils import (INTERPRETER_BLOCK, Launcher, check_activations, dot_fp32, dot_fp32_error,
                            reference_unless_handled, use_interpreter)

#: GPU configs: BLOCK_K columns of a (or g) per step; BLOCK_T is chosen from T by the wrapper.
GHOST_CONFIGS = [
    triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=2),
]


@triton.jit
def _gram_tile(x_ptr, sample, offs_t, offs_s, T, width, width_limit, stride_b, stride_t, stride_k,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile of x_i x_iᵀ at rows offs_t, columns offs_s, summed over columns [0, width_limit)."""
    x_sample = x_ptr + sample.to(tl.int64) * stride_b
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, width_limit, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rows = tl.load(x_sample + offs_t[:, None] * stride_t + offs_k[None, :] * stride_k,
                       mask=(offs_t[:, None] < T) & (offs_k[None, :] < width), other=0.0)
        cols = tl.load(x_sample + offs_k[:, None] * stride_k + offs_s[None, :] * stride_t,
                       mask=(offs_k[:, None] < width) & (offs_s[None, :] < T), other=0.0)
        acc = dot_fp32(rows, cols, acc)
    return acc


@triton.jit
def _linear_ghost_norm_kernel(a_ptr, g_ptr, partials_ptr, T, d, p,
                              stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp,
                              BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    sample = tl.program_id(0)
    block_t = tl.program_id(1)
    block_s = tl.program_id(2)
    n_blocks = tl.num_programs(1)
    offs_t = block_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = block_s * BLOCK_T + tl.arange(0, BLOCK_T)
    upper = (block_s >= block_t).to(tl.int32)  # lower-triangle blocks: empty loops, weight 0
    weight = tl.where(block_s > block_t, 2.0, 1.0) * upper
    a_gram = _gram_tile(a_ptr, sample, offs_t, offs_s, T, d, d * upper, stride_ab, stride_at, stride_ad,
                        BLOCK_T, BLOCK_K)
    g_gram = _gram_tile(g_ptr, sample, offs_t, offs_s, T, p, p * upper, stride_gb, stride_gt, stride_gp,
                        BLOCK_T, BLOCK_K)
    partial = weight * tl.sum(a_gram.to(tl.float64) * g_gram.to(tl.float64))  # exact products, float64 sum
    tl.store(partials_ptr + sample.to(tl.int64) * n_blocks * n_blocks + block_t * n_blocks + block_s, partial)


# Every program writes its partial, so the buffer needs no zeroing, even while autotuning.
_launch = Launcher(_linear_ghost_norm_kernel, GHOST_CONFIGS, key=["d", "p", "BLOCK_T"],
                   interpreter_config={"BLOCK_K": INTERPRETER_BLOCK})


def ghost_block_t(T: int) -> int:
    """Rows of the Gram tile: enough for short sequences, capped so the two fp32 tiles fit in registers."""
    if use_interpreter():
        return INTERPRETER_BLOCK
    return max(16, min(64, triton.next_power_of_2(T)))


@triton.jit
def _goodfellow_norm_kernel(a_ptr, g_ptr, out_ptr, d, p, stride_ab, stride_ad, stride_gb, stride_gp,
                            BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    a_sample = a_ptr + sample.to(tl.int64) * stride_ab
    g_sample = g_ptr + sample.to(tl.int64) * stride_gb
    a_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(a_sample + offs * stride_ad, mask=offs < d, other=0.0).to(tl.float32)
        a_sq += x * x
    g_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, p, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(g_sample + offs * stride_gp, mask=offs < p, other=0.0).to(tl.float32)
        g_sq += x * x
    tl.store(out_ptr + sample, tl.sum(a_sq).to(tl.float64) * tl.sum(g_sq).to(tl.float64))


_GOODFELLOW_BLOCK = INTERPRETER_BLOCK if use_interpreter() else 1024


@reference_unless_handled(_ops.linear_norm_sq_ghost, 0, 1, check=check_activations)
def linear_norm_sq_ghost(a: torch.Tensor, g: torch.Tensor, mass=None) -> torch.Tensor:
    """An upper bound of ||g_iᵀ a_i||²_F per sample from <a_i a_iᵀ, g_i g_iᵀ>, no T×T matrix in memory:
    the kernel's value plus its rounding bound (``fastdp.ops.rounding``), float64 [B]."""
    B, T, d = a.shape
    p = g.shape[-1]
    if T == 1:  # the Goodfellow product: each factor a plain fp32 sum of squares (γ_width, any order)
        value = torch.empty(B, dtype=torch.float64, device=a.device)
        _goodfellow_norm_kernel[(B,)](a, g, value, d, p, a.stride(0), a.stride(2), g.stride(0), g.stride(2),
                                      BLOCK=_GOODFELLOW_BLOCK)
        errors = rounding.gamma(d + 1), rounding.gamma(p + 1)
    else:
        block_t = ghost_block_t(T)
        n_blocks = triton.cdiv(T, block_t)
        partials = torch.empty(B, n_blocks * n_blocks, dtype=torch.float64, device=a.device)
        _launch(lambda meta: (B, n_blocks, n_blocks), a, g, partials, T, d, p, *a.stride(), *g.stride(),
                BLOCK_T=block_t)
        value = partials.sum(1)
        errors = dot_fp32_error(d, a.dtype), dot_fp32_error(p, g.dtype)
    return rounding.ghost_norm_sq_upper(value, rounding.term_mass(a, g) if mass is None else mass, *errors,
                                         rounding.gamma(T * T, rounding.UNIT_ROUNDOFF[torch.float64]))


register_impl("linear_norm_sq_ghost", "triton", linear_norm_sq_ghost)
