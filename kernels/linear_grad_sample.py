"""Per-sample weight gradients of a linear-type layer, g_iᵀ a_i ([B, p, d]), as a batched GEMM.

``per_sample_grad_tile`` (one [BLOCK_P, BLOCK_D] tile of one G_i, accumulated over T in
fp32) is shared with the direct-norm kernel, which squares the tile instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.ops import linear as _ops
from fastdp.ops import register_impl

from ._triton_utils import INTERPRETER_BLOCK, Launcher, check_activations, dot_fp32, reference_unless_handled

#: GPU configs for a [BLOCK_P, BLOCK_D] tile of G_i with BLOCK_T rows of a, g per step.
PER_SAMPLE_TILE_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_D": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 128, "BLOCK_T": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
]
PER_SAMPLE_TILE_INTERPRETER = {"BLOCK_P": INTERPRETER_BLOCK, "BLOCK_D": INTERPRETER_BLOCK, "BLOCK_T": INTERPRETER_BLOCK}


@triton.jit
def per_sample_grad_tile(a_ptr, g_ptr, sample, offs_p, offs_d, T, d, p,
                         stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp,
                         BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 tile G_sample[offs_p, offs_d] = Σ_t g[sample, t, offs_p] a[sample, t, offs_d]; zero outside p×d."""
    a_sample = a_ptr + sample.to(tl.int64) * stride_ab
    g_sample = g_ptr + sample.to(tl.int64) * stride_gb
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        g_tile = tl.load(  # [BLOCK_P, BLOCK_T]: g transposed by its addresses
            g_sample + offs_p[:, None] * stride_gp + offs_t[None, :] * stride_gt,
            mask=(offs_p[:, None] < p) & (offs_t[None, :] < T), other=0.0,
        )
        a_tile = tl.load(  # [BLOCK_T, BLOCK_D]
            a_sample + offs_t[:, None] * stride_at + offs_d[None, :] * stride_ad,
            mask=(offs_t[:, None] < T) & (offs_d[None, :] < d), other=0.0,
        )
        acc = dot_fp32(g_tile, a_tile, acc)
    return acc


@triton.jit
def _linear_grad_sample_kernel(a_ptr, g_ptr, out_ptr, T, d, p,
                               stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp,
                               BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    sample = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile = per_sample_grad_tile(a_ptr, g_ptr, sample, offs_p, offs_d, T, d, p,
                                stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp,
                                BLOCK_T, BLOCK_P, BLOCK_D)
    out = out_ptr + sample.to(tl.int64) * p * d + offs_p[:, None] * d + offs_d[None, :]
    tl.store(out, tile.to(out_ptr.dtype.element_ty), mask=(offs_p[:, None] < p) & (offs_d[None, :] < d))


_launch = Launcher(_linear_grad_sample_kernel, PER_SAMPLE_TILE_CONFIGS, key=["d", "p"],
                   interpreter_config=PER_SAMPLE_TILE_INTERPRETER)


@reference_unless_handled(_ops.linear_grad_sample, 0, 1, check=check_activations)
def linear_grad_sample(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients g_iᵀ a_i: [B, p, d] in the input dtype (fp32 accumulation)."""
    B, T, d = a.shape
    p = g.shape[-1]
    out = torch.empty(B, p, d, dtype=g.dtype, device=g.device)
    grid = lambda meta: (B, triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _launch(grid, a, g, out, T, d, p, *a.stride(), *g.stride())
    return out


register_impl("linear_grad_sample", "triton", linear_grad_sample)
