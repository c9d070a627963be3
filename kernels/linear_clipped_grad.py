"""Clipped summed gradients of a linear-type layer: Σ_i c_i g_iᵀ a_i and Σ_i c_i Σ_t g_it.

Weight: one GEMM over the B·T rows, (c ⊙ g)ᵀ a, with the per-sample clip factor applied
to each tile of g as it is loaded (no scaled copy of g in memory). Like the torch
reference, c ⊙ g is rounded to the input dtype before the product, which then
accumulates in fp32; the result is in the input dtype.

Bias: each program sums c_i g_it over one slice of the rows in fp32; the slices' partial
sums are added in torch (deterministic, and enough programs even when p is small).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdp.ops import linear as _ops
from fastdp.ops import register_impl

from ._triton_utils import (INTERPRETER_BLOCK, Launcher, check_activations, check_clip_factors, check_device,
                            dot_fp32, kernel_handles, use_interpreter)

#: GPU configs: a [BLOCK_P, BLOCK_D] output tile, BLOCK_K rows of a, g per step.
CLIPPED_GEMM_CONFIGS = [
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_D": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]


@triton.jit
def _linear_clipped_grad_kernel(a_ptr, g_ptr, c_ptr, out_ptr, rows, T, d, p,
                                stride_ab, stride_at, stride_ad, stride_gb, stride_gt, stride_gp,
                                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K)  # row r of the flattened [B·T] view is (r // T, r % T)
        in_rows = offs_r < rows
        sample = (offs_r // T).to(tl.int64)
        t = (offs_r % T).to(tl.int64)
        g_tile = tl.load(  # [BLOCK_P, BLOCK_K]: g transposed by its addresses
            g_ptr + sample[None, :] * stride_gb + t[None, :] * stride_gt + offs_p[:, None] * stride_gp,
            mask=in_rows[None, :] & (offs_p[:, None] < p), other=0.0,
        )
        c = tl.load(c_ptr + sample, mask=in_rows, other=0.0).to(tl.float32)
        g_scaled = (g_tile.to(tl.float32) * c[None, :]).to(g_tile.dtype)
        a_tile = tl.load(  # [BLOCK_K, BLOCK_D]
            a_ptr + sample[:, None] * stride_ab + t[:, None] * stride_at + offs_d[None, :] * stride_ad,
            mask=in_rows[:, None] & (offs_d[None, :] < d), other=0.0,
        )
        acc = dot_fp32(g_scaled, a_tile, acc)
    tl.store(out_ptr + offs_p[:, None] * d + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_p[:, None] < p) & (offs_d[None, :] < d))


_launch = Launcher(_linear_clipped_grad_kernel, CLIPPED_GEMM_CONFIGS, key=["d", "p"],
                   interpreter_config={"BLOCK_P": INTERPRETER_BLOCK, "BLOCK_D": INTERPRETER_BLOCK,
                                       "BLOCK_K": INTERPRETER_BLOCK})


def linear_clipped_grad(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i g_iᵀ a_i: [p, d] in the input dtype."""
    check_activations(a, g)
    check_clip_factors(c, a.shape[0])
    if not kernel_handles(a, g):
        return _ops.linear_clipped_grad.torch_reference(a, g, c)
    check_device(a, g, c)
    B, T, d = a.shape
    p = g.shape[-1]
    c = c.to(g.dtype).contiguous()  # the reference rounds c to g's dtype too
    out = torch.empty(p, d, dtype=g.dtype, device=g.device)
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    _launch(grid, a, g, c, out, B * T, T, d, p, *a.stride(), *g.stride())
    return out


@triton.jit
def _linear_bias_clipped_grad_kernel(g_ptr, c_ptr, partials_ptr, rows, rows_per_slice, T, p,
                                     stride_gb, stride_gt, stride_gp,
                                     BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slice_index = tl.program_id(1)
    first_row = slice_index * rows_per_slice
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for r0 in range(0, rows_per_slice, BLOCK_K):
        offs_r = first_row + r0 + tl.arange(0, BLOCK_K)
        in_rows = offs_r < rows
        sample = (offs_r // T).to(tl.int64)
        t = (offs_r % T).to(tl.int64)
        g_tile = tl.load(g_ptr + sample[:, None] * stride_gb + t[:, None] * stride_gt + offs_p[None, :] * stride_gp,
                         mask=in_rows[:, None] & (offs_p[None, :] < p), other=0.0)
        c = tl.load(c_ptr + sample, mask=in_rows, other=0.0).to(tl.float32)
        acc += tl.sum(g_tile.to(tl.float32) * c[:, None], axis=0)
    tl.store(partials_ptr + slice_index.to(tl.int64) * p + offs_p, acc, mask=offs_p < p)


_BIAS_BLOCKS = ({"BLOCK_P": INTERPRETER_BLOCK, "BLOCK_K": INTERPRETER_BLOCK} if use_interpreter()
                else {"BLOCK_P": 128, "BLOCK_K": 32})
#: row slices of the bias sum on GPU: enough programs to fill the machine when p is small.
_BIAS_TARGET_SLICES = 64


def linear_bias_clipped_grad(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i Σ_t g_it: [p] in g's dtype (fp32 accumulation)."""
    if g.dim() != 3:
        raise ValueError(f"g must be [B, T, p], got shape {tuple(g.shape)} (reshape to the sequence view first)")
    check_clip_factors(c, g.shape[0])
    if not kernel_handles(g):
        return _ops.linear_bias_clipped_grad.torch_reference(g, c)
    check_device(g, c)
    B, T, p = g.shape
    rows = B * T
    block_k = _BIAS_BLOCKS["BLOCK_K"]
    rows_per_slice = triton.cdiv(triton.cdiv(rows, _BIAS_TARGET_SLICES), block_k) * block_k
    slices = triton.cdiv(rows, rows_per_slice)
    c = c.to(g.dtype).contiguous()  # the reference rounds c to g's dtype too
    partials = torch.empty(slices, p, dtype=torch.float32, device=g.device)
    grid = (triton.cdiv(p, _BIAS_BLOCKS["BLOCK_P"]), slices)
    _linear_bias_clipped_grad_kernel[grid](g, c, partials, rows, rows_per_slice, T, p, *g.stride(), **_BIAS_BLOCKS)
    return partials.sum(0).to(g.dtype)


# Not the automatic choice on CUDA until measured: the torch path is one cuBLAS GEMM after a
# scale (TF32 where torch allows it), this kernel fp32 via tf32x3 and without split-K. Compare them with
# `python -m bench.bench_kernels_linear` and FASTDP_BACKEND=triton|torch in `python -m bench`.
register_impl("linear_clipped_grad", "triton", linear_clipped_grad, automatic=False)
register_impl("linear_bias_clipped_grad", "triton", linear_bias_clipped_grad)
