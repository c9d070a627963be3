"""Per-sample ops for linear-type layers, in the sequence view a: [B, T, d], g: [B, T, p].

A linear layer's per-sample weight gradient is ``G_i = g_iᵀ a_i`` ([p, d]); its bias
gradient is ``sum_t g_it``. Conv layers reach these ops through their unfold view
(T = output positions), so everything here is batch-first plain tensors that a
Triton or CUDA kernel can replace op by op.

Norm ops return float32 ``[B]`` whatever the input dtype; gradient ops return the
input dtype (the rule casts to the parameter dtype).
"""

from __future__ import annotations

import torch

from . import op

#: scratch elements one chunk of a torch reference may allocate; bounds the memory of
#: per-sample Gram matrices, per-sample gradients and conv patches to ~64 MiB (fp32).
CHUNK_NUMEL = 1 << 24


def batch_chunks(batch: int, numel_per_sample: int):
    """Slices over the batch so that each chunk's scratch stays under CHUNK_NUMEL."""
    step = max(1, CHUNK_NUMEL // max(1, numel_per_sample))
    return (slice(start, start + step) for start in range(0, batch, step))


def choose_linear_norm_method(B: int, T: int, d: int, p: int) -> str:
    """``"ghost"`` when the Gram form is cheaper than forming G_i, else ``"direct"``.

    Ghost costs ~2BT²(d+p) FLOPs, direct ~2BTpd, so ghost wins when T(d+p) < pd;
    both are linear in B, which therefore never changes the choice. T = 1 is always
    ghost: there the Gram form is the Goodfellow product ||a_i||²·||g_i||².
    """
    return "ghost" if T == 1 or T * (d + p) < p * d else "direct"


def materialising_is_cheaper(T: int, d: int, p: int) -> bool:
    """Whether keeping the per-sample grads [B, p, d] beats computing norm and clipped sum apart.

    Exactly when the direct method is chosen (pd ≤ T(d+p)), the per-sample gradients are no
    larger than the activations (a, g) the engine already holds, and the torch reference of
    the direct norm forms them anyway: keeping them turns the clipped sum into a cheap
    weighted sum instead of a second weight-gradient GEMM. A fused kernel changes that.
    """
    return T > 1 and choose_linear_norm_method(1, T, d, p) == "direct"


@op("linear_norm_sq_ghost")
def linear_norm_sq_ghost(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||g_iᵀ a_i||²_F as <a_i a_iᵀ, g_i g_iᵀ>: T×T Grams instead of the p×d gradient."""
    B, T, d = a.shape
    p = g.shape[-1]
    if T == 1:
        return a.float().square().sum((1, 2)) * g.float().square().sum((1, 2))
    out = torch.empty(B, dtype=torch.float32, device=a.device)
    for rows in batch_chunks(B, T * (d + p) + 2 * T * T):
        a_chunk, g_chunk = a[rows].float(), g[rows].float()
        a_gram = torch.bmm(a_chunk, a_chunk.mT)
        g_gram = torch.bmm(g_chunk, g_chunk.mT)
        out[rows] = (a_gram * g_gram).sum((1, 2))
    return out


@op("linear_norm_sq_direct")
def linear_norm_sq_direct(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||g_iᵀ a_i||²_F by forming each G_i (a chunk of samples at a time; kernels: tile by tile)."""
    B, T, d = a.shape
    p = g.shape[-1]
    out = torch.empty(B, dtype=torch.float32, device=a.device)
    for rows in batch_chunks(B, T * (d + p) + p * d):
        per_sample = torch.bmm(g[rows].float().mT, a[rows].float())
        out[rows] = per_sample.square().sum((1, 2))
    return out


def linear_weight_norm_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample squared weight-gradient norms by the cheaper method for this shape."""
    B, T, d = a.shape
    method = choose_linear_norm_method(B, T, d, g.shape[-1])
    return linear_norm_sq_ghost(a, g) if method == "ghost" else linear_norm_sq_direct(a, g)


@op("linear_bias_norm_sq")
def linear_bias_norm_sq(g: torch.Tensor) -> torch.Tensor:
    """||sum_t g_it||² per sample, float32 [B]."""
    return g.sum(1, dtype=torch.float32).square().sum(1)


@op("linear_clipped_grad")
def linear_clipped_grad(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i g_iᵀ a_i = (c ⊙ g)ᵀ a as one GEMM over the B·T rows: [p, d]."""
    scaled = g * c.to(g.dtype)[:, None, None]
    return scaled.flatten(0, 1).T @ a.flatten(0, 1)


@op("linear_bias_clipped_grad")
def linear_bias_clipped_grad(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i sum_t g_it: [p]."""
    return c.to(g.dtype) @ g.sum(1)


@op("linear_grad_sample")
def linear_grad_sample(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients g_iᵀ a_i: [B, p, d]."""
    return torch.bmm(g.mT, a)


# -- cross terms of a shared (tied) parameter -------------------------------------------------
# A parameter used by several calls has per-sample gradient G_i = sum_u G_i^(u); the norm of the
# sum needs the inner products <G_i^(u), G_i^(v)> of the uses. Each use is a sum of outer
# products G_i^(u) = sum_t x_it ⊗ y_it (linear: x = g, y = a), so the inner product is
# sum_{t,s} (x_it · x'_is)(y_it · y'_is): two cross Grams, never the p×d gradients.
# These are batched GEMMs that torch runs well on any device, so they are plain functions, not
# dispatched ops (a fused kernel keeping the T1×T2 Grams on chip could make them ops later).


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def choose_cross_method(T1: int, T2: int, p: int, d: int) -> str:
    """``"ghost"`` (cross Grams, ~2B·T1·T2·(p+d) FLOPs) unless forming both G_i costs less
    (``"direct"``, ~2B·(T1+T2)·p·d FLOPs, a chunk of samples at a time)."""
    return "ghost" if T1 * T2 * (p + d) <= (T1 + T2) * p * d else "direct"


def linear_cross_inner_ghost(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """<x1_iᵀ y1_i, x2_iᵀ y2_i>_F per sample as <x1_i x2_iᵀ, y1_i y2_iᵀ> (T1×T2 cross Grams): [B]."""
    B, T1, p = x1.shape
    T2, d = x2.shape[1], y1.shape[-1]
    dtype = _accumulation_dtype(x1, y1, x2, y2)
    out = torch.empty(B, dtype=dtype, device=x1.device)
    for rows in batch_chunks(B, (T1 + T2) * (p + d) + 2 * T1 * T2):
        x_gram = torch.bmm(x1[rows].to(dtype), x2[rows].to(dtype).mT)
        y_gram = torch.bmm(y1[rows].to(dtype), y2[rows].to(dtype).mT)
        out[rows] = (x_gram * y_gram).sum((1, 2))
    return out


def linear_cross_inner_direct(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """<x1_iᵀ y1_i, x2_iᵀ y2_i>_F per sample by forming both p×d products, a chunk of samples at a time: [B]."""
    B, T1, p = x1.shape
    T2, d = x2.shape[1], y1.shape[-1]
    dtype = _accumulation_dtype(x1, y1, x2, y2)
    out = torch.empty(B, dtype=dtype, device=x1.device)
    for rows in batch_chunks(B, (T1 + T2) * (p + d) + 2 * p * d):
        first = torch.bmm(x1[rows].to(dtype).mT, y1[rows].to(dtype))
        second = torch.bmm(x2[rows].to(dtype).mT, y2[rows].to(dtype))
        out[rows] = (first * second).sum((1, 2))
    return out


def linear_cross_inner(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """Per-sample <sum_t x1_t ⊗ y1_t, sum_s x2_s ⊗ y2_s> for x: [B, T, p], y: [B, T, d] (T may differ
    between the two uses), by the cheaper method for these shapes; float32 (float64 for float64) [B]."""
    method = choose_cross_method(x1.shape[1], x2.shape[1], x1.shape[-1], y1.shape[-1])
    return (linear_cross_inner_ghost if method == "ghost" else linear_cross_inner_direct)(x1, y1, x2, y2)
