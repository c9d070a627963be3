"""Per-sample ops for linear-type layers, in the sequence view a: [B, T, d], g: [B, T, p].

A linear layer's per-sample weight gradient is ``G_i = g_iᵀ a_i`` ([p, d]); its bias
gradient is ``sum_t g_it``. Conv layers reach these ops through their unfold view
(T = output positions), so everything here is batch-first plain tensors that a
Triton or CUDA kernel can replace op by op.

Norm ops return upper bounds (``fastdp.ops.rounding``) as float64 ``[B]`` whatever the input
dtype; gradient ops return the input dtype (the rule casts to the parameter dtype).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import op, rounding

#: scratch elements one chunk of a torch reference may allocate; bounds the memory of
#: per-sample Gram matrices, per-sample gradients and conv patches to ~16 MiB (fp32).
CHUNK_NUMEL = 1 << 22
#: the scaled copy of g in an in-place clipped sum may always take this many elements (256 KiB of fp32)
MIN_SCALED_NUMEL = 1 << 16


def batch_chunks(batch: int, numel_per_sample: int, budget: Optional[int] = None):
    """Slices over the batch so that each chunk's scratch stays under ``budget`` (CHUNK_NUMEL) elements."""
    step = max(1, (CHUNK_NUMEL if budget is None else budget) // max(1, numel_per_sample))
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
def linear_norm_sq_ghost(a: torch.Tensor, g: torch.Tensor, mass=None) -> torch.Tensor:
    """An upper bound of ||g_iᵀ a_i||²_F from <a_i a_iᵀ, g_i g_iᵀ> (T×T Grams instead of the p×d
    gradient) plus the Grams' rounding bound (``rounding.ghost_norm_sq_upper``): float64 [B].
    T = 1 is the Goodfellow product ||a_i||²·||g_i||², computed in float64. ``mass``: the samples'
    term mass ``rounding.term_mass(a, g)`` when the caller has it already."""
    B, T, d = a.shape
    p = g.shape[-1]
    if T == 1:
        return rounding.product_norm_sq_upper(a[:, 0], g[:, 0])
    dtype = rounding.accumulation_dtype(a, g)
    value = torch.empty(B, dtype=torch.float64, device=a.device)
    with rounding.ieee_fp32():
        for rows in batch_chunks(B, T * (d + p) + 8 * T * T):
            a_gram = rounding.chunked_bmm(a[rows], a[rows].mT, dtype)
            g_gram = rounding.chunked_bmm(g[rows], g[rows].mT, dtype)
            value[rows] = (a_gram * g_gram).sum((1, 2), dtype=torch.float64)
    sum_error = (1 + rounding.UNIT_ROUNDOFF[dtype]) * (1 + rounding.gamma(T * T, rounding.UNIT_ROUNDOFF[torch.float64])) - 1
    return rounding.ghost_norm_sq_upper(
        value, rounding.term_mass(a, g) if mass is None else mass, rounding.chunked_dot_error(d, dtype),
        rounding.chunked_dot_error(p, dtype), sum_error,
    )


@op("linear_norm_sq_direct")
def linear_norm_sq_direct(a: torch.Tensor, g: torch.Tensor, mass=None) -> torch.Tensor:
    """An upper bound of ||g_iᵀ a_i||²_F by forming each G_i (a chunk of samples at a time; kernels:
    tile by tile) plus its rounding bound (``rounding.direct_norm_sq_upper``): float64 [B]."""
    B, T, d = a.shape
    p = g.shape[-1]
    dtype = rounding.accumulation_dtype(a, g)
    value = torch.empty(B, dtype=torch.float64, device=a.device)
    with rounding.ieee_fp32():
        for rows in batch_chunks(B, T * (d + p) + 5 * p * d):
            per_sample = rounding.chunked_bmm(g[rows].mT, a[rows], dtype)
            value[rows] = rounding.row_sq_sums_float64(per_sample.flatten(1))
    return rounding.direct_norm_sq_upper(
        value, rounding.term_mass(a, g) if mass is None else mass, rounding.chunked_dot_error(T, dtype),
        rounding.gamma(p * d, rounding.UNIT_ROUNDOFF[torch.float64]),
    )


def linear_weight_norm_sq(a: torch.Tensor, g: torch.Tensor, mass=None) -> torch.Tensor:
    """Upper bounds of the per-sample squared weight-gradient norms by the cheaper method for this shape."""
    B, T, d = a.shape
    method = choose_linear_norm_method(B, T, d, g.shape[-1])
    return (linear_norm_sq_ghost if method == "ghost" else linear_norm_sq_direct)(a, g, mass=mass)


@op("linear_bias_norm_sq")
def linear_bias_norm_sq(g: torch.Tensor, mass=None) -> torch.Tensor:
    """An upper bound of ||sum_t g_it||² per sample, float64 [B]: the computed sum is within
    γ_T Σ_t ||g_t|| of exact (``rounding.direct_norm_sq_upper`` with the bias's term mass
    ``rounding.bias_term_mass(g)``, or ``mass`` when the caller has it)."""
    if g.shape[1] == 1:
        return rounding.norm_sq_upper(g)
    dtype = rounding.accumulation_dtype(g)
    value = torch.linalg.vector_norm(g.sum(1, dtype=dtype), dim=1, dtype=torch.float64).square()
    return rounding.direct_norm_sq_upper(
        value, rounding.bias_term_mass(g) if mass is None else mass,
        rounding.gamma(g.shape[1], rounding.UNIT_ROUNDOFF[dtype]),
        rounding.gamma(g.shape[2] + 3, rounding.UNIT_ROUNDOFF[torch.float64]),
    )


@op("linear_clipped_grad")
def linear_clipped_grad(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i g_iᵀ a_i = (c ⊙ g)ᵀ a as one GEMM over the B·T rows: [p, d]."""
    scaled = g * c.to(g.dtype)[:, None, None]
    return scaled.flatten(0, 1).T @ a.flatten(0, 1)


def add_linear_clipped_grad(out: torch.Tensor, a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, transposed: bool = False) -> None:
    """``out += sum_i c_i g_iᵀ a_i`` in place (``out`` [p, d], or [d, p] with ``transposed``; the dtype of a
    and g): ``linear_clipped_grad``'s GEMM, the same products c_i·g_t ⊗ a_t, accumulating into ``out`` with
    no gradient-sized temporary. The scaled copy of g is made a block of output features at a time (each
    GEMM still reduces over all the chunk's rows), at most a quarter of g and CHUNK_NUMEL elements, so it
    stays small beside the gradient being written (an MLP's peak under per-layer clipping); samples are
    chunked too only when that leaves fewer than 64 features per block. Each sample's rows are reduced
    inside one GEMM (the model of ``fastdp.ops.rounding``)."""
    B, T, p = g.shape
    budget = min(CHUNK_NUMEL, max(MIN_SCALED_NUMEL, g.numel() // 4))
    min_features = min(p, 64)
    for rows in batch_chunks(B, T * min_features, budget):
        y = a[rows].flatten(0, 1)
        c_rows = c[rows].to(g.dtype)[:, None, None]
        step = max(min_features, budget // max(1, y.shape[0]))
        for start in range(0, p, step):
            features = slice(start, start + step)
            x = (g[rows, :, features] * c_rows).flatten(0, 1)
            if transposed:
                out[:, features].addmm_(y.T, x)
            else:
                out[features].addmm_(x.T, y)
            del x  # before the next block's copy exists


@op("linear_bias_clipped_grad")
def linear_bias_clipped_grad(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i sum_t g_it: [p]. One position: ``g[:, 0]`` is that sum already (a view, no [B, p] copy)."""
    return c.to(g.dtype) @ (g[:, 0] if g.shape[1] == 1 else g.sum(1))


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
# Like the norms, they return upper bounds: the engine adds 2·(cross terms) to the uses' norms,
# and a cancelling sum must not come out below the exact one.


def choose_cross_method(T1: int, T2: int, p: int, d: int) -> str:
    """``"ghost"`` (cross Grams, ~2B·T1·T2·(p+d) FLOPs) unless forming both G_i costs less
    (``"direct"``, ~2B·(T1+T2)·p·d FLOPs, a chunk of samples at a time)."""
    return "ghost" if T1 * T2 * (p + d) <= (T1 + T2) * p * d else "direct"


def linear_cross_inner(x1: torch.Tensor, y1: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """An upper bound of the per-sample <sum_t x1_t ⊗ y1_t, sum_s x2_s ⊗ y2_s> for x: [B, T, p], y: [B, T, d]
    (T may differ between the two uses): float64 [B]. By the cheaper method for these shapes: the cross
    Grams <x1 x2ᵀ, y1 y2ᵀ> ("ghost") or both p×d products ("direct"), a chunk of samples at a time; the
    rounding bound is ``error · S1 · S2`` (``rounding.cross_inner_upper``)."""
    B, T1, p = x1.shape
    T2, d = x2.shape[1], y1.shape[-1]
    dtype = rounding.accumulation_dtype(x1, y1, x2, y2)
    ghost = choose_cross_method(T1, T2, p, d) == "ghost"
    value = torch.empty(B, dtype=torch.float64, device=x1.device)
    scratch = (T1 + T2) * (p + d) + 6 * (T1 * T2 if ghost else p * d)
    with rounding.ieee_fp32():
        for rows in batch_chunks(B, scratch):
            if ghost:
                first = rounding.chunked_bmm(x1[rows], x2[rows].mT, dtype)
                second = rounding.chunked_bmm(y1[rows], y2[rows].mT, dtype)
            else:
                first = rounding.chunked_bmm(x1[rows].mT, y1[rows], dtype)
                second = rounding.chunked_bmm(x2[rows].mT, y2[rows], dtype)
            value[rows] = (first.double() * second.double()).sum((1, 2))
    widths, terms = ((p, d), T1 * T2) if ghost else ((T1, T2), p * d)
    error = (
        (1 + rounding.chunked_dot_error(widths[0], dtype)) * (1 + rounding.chunked_dot_error(widths[1], dtype))
        * (1 + rounding.gamma(terms, rounding.UNIT_ROUNDOFF[torch.float64])) - 1
    )
    return rounding.cross_inner_upper(value, rounding.term_mass(y1, x1), rounding.term_mass(y2, x2), error)
