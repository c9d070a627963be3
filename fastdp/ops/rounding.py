"""Floating-point error bounds: every norm the engine clips with bounds the contribution *as computed*.

A sample's gradient for a linear-type parameter is ``G_i = Σ_t g_t ⊗ a_t`` (T positions, a conv's
patches, an embedding's one-hot rows). Rounding enters twice, and both times its size is set by
the sample's **term mass** ``S_i = Σ_t ‖g_t‖‖a_t‖``, not by ``‖G_i‖``: when a sample's terms
cancel, ``S_i`` can exceed ``‖G_i‖`` by any factor, and an error relative to ``S_i`` can swamp
the norm (a crafted fp32 sample whose terms are 1e4× its sum got a ghost norm of exactly 0).

1. **Per-sample norms.** Every norm op returns an *upper bound* of the exact ``‖G_i‖²`` of the
   recorded ``(a, g)``: its computed value plus a rigorous bound on its own rounding, written in
   terms of ``S_i`` (``ghost_norm_sq_upper``, ``direct_norm_sq_upper``, ``cross_inner_upper``).
   Cost: one pass over ``a`` and ``g`` for ``S_i`` (O(B·T·(d+p))). Norms of *materialised*
   per-sample gradients bound the tensor that is summed (``norm_sq_upper``).
2. **Clipped sums.** ``Σ_i c_i G_i`` is formed without materialising ``G_i`` (one GEMM over the
   rows of ``c ⊙ g`` and ``a``). Each product ``c·g_t`` is rounded (to bf16/fp16, or to the GEMM's
   operand format: TF32) and the reduction over rows rounds partial sums that can hold a large
   part of one sample's cancelling terms. A rule reports the slack ``s_i = κ S_i``
   (``LayerRule.rounding_slack``, κ from ``clipped_sum_error``), and the engine clips with
   ``‖G_i‖_up + s_i``; what is summed for sample i is then within ``c_i (‖G_i‖_up + s_i) ≤ C``.

Error model (Higham, *Accuracy and Stability of Numerical Algorithms*, §3): a sum or dot product
of n terms, evaluated in any order in a format of unit roundoff u, is within ``γ_n Σ|terms|``
of the exact value, ``γ_n = n u / (1 - n u)``. Our own reductions over dimensions longer than
``UNCHUNKED_WIDTH`` run in chunks of ``INNER_CHUNK`` (``chunked_bmm``) so that n stays small, and the final sums
of many non-negative or cancelling terms run in float64. For the reduction over the B·T rows of
a clipped sum, whose order belongs to the BLAS/cuDNN/oneDNN library, the bound assumes what
their GEMM kernels do: rows are reduced as contiguous blocks (sequential, blocked, split-K or a
tree over blocks); each sample's rows are contiguous (our layouts are sample-major), so the
partial sums holding part of one sample's terms number at most ``T + 2⌈log2 n⌉``. FFT and
Winograd convolution algorithms fall outside that model.

Not counted, as in every DP library: rounding at the magnitude of the clipped contributions
themselves (each ≤ C), e.g. the final rounding of the batch's sum to the parameter's dtype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
import torch
import torch.nn.functional as F

#: unit roundoff (half the spacing of the numbers in [1, 2)) of each format
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TF32_ROUNDOFF = 2.0**-11
#: what fastdp's Triton kernels' tf32x3 products may lose per fp32 product (``kernels/_triton_utils.py``)
TF32X3_PRODUCT_ERROR = 3 * 2.0**-22

#: dot products longer than ``UNCHUNKED_WIDTH`` run in pieces of ``INNER_CHUNK`` (``chunked_bmm``): γ grows
#: with the length reduced in one piece, and the pieces cost little once the width is large
INNER_CHUNK = 256
UNCHUNKED_WIDTH = 1024


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: where norms and sums are computed."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def gamma(n, unit: float = UNIT_ROUNDOFF[torch.float32]):
    """γ_n = n u / (1 - n u): the relative error bound of n roundings (inf once n u ≥ 1); ``n`` may be a
    tensor of counts."""
    nu = n * unit
    if isinstance(nu, torch.Tensor):
        return torch.where(nu < 1, nu / (1 - nu), torch.full_like(nu, math.inf))
    return nu / (1 - nu) if nu < 1 else math.inf


def chunked_dot_error(width: int, dtype: torch.dtype = torch.float32) -> float:
    """The error bound, relative to Σ|x_k y_k|, of a length-``width`` dot product by ``chunked_bmm`` in
    ``dtype`` (float32 or float64)."""
    if width <= UNCHUNKED_WIDTH:
        return gamma(width, UNIT_ROUNDOFF[dtype])
    return gamma(INNER_CHUNK + -(-width // INNER_CHUNK) - 1, UNIT_ROUNDOFF[dtype])


def chunked_bmm(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x @ y`` (batched) in ``dtype``, reducing the inner dimension in pieces of ``INNER_CHUNK`` so
    that each result is within ``chunked_dot_error(width)`` of exact, whatever the BLAS's order.
    Call it under ``ieee_fp32()``: the bound assumes IEEE products, not TF32."""
    width = x.shape[-1]
    if width <= UNCHUNKED_WIDTH:
        return torch.matmul(x.to(dtype), y.to(dtype))
    out = None
    for start in range(0, width, INNER_CHUNK):
        part = torch.matmul(x[..., start : start + INNER_CHUNK].to(dtype), y[..., start : start + INNER_CHUNK, :].to(dtype))
        out = part if out is None else out.add_(part)
    return out


def round_up_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 values ≥ ``x`` (float64): the nearest float32, moved up one step where it fell below."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, math.inf)), y)


#: margin for the float64 arithmetic of the bounds themselves (a few roundings of non-negative terms)
BOUND_ARITHMETIC = 1 + 2.0**-48


def row_norms_upper(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Upper bounds of the 2-norms along ``dim``, float64."""
    dtype = accumulation_dtype(x)
    return torch.linalg.vector_norm(x, dim=dim, dtype=dtype).double() * (1 + gamma(x.shape[dim] + 2, UNIT_ROUNDOFF[dtype]))


def term_masses(a: torch.Tensor, g: torch.Tensor):
    """Upper bounds of ``S_i = Σ_t ‖a_t‖‖g_t‖`` and of ``Σ_t ‖g_t‖`` (a bias's term mass: its input is 1)
    for a [B, T, d], g [B, T, p], from one pass over each: float64 [B] both."""
    dtype = accumulation_dtype(a, g)
    unit = UNIT_ROUNDOFF[dtype]
    g_norms = torch.linalg.vector_norm(g, dim=2, dtype=dtype)
    products = torch.linalg.vector_norm(a, dim=2, dtype=dtype) * g_norms
    g_error = (1 + gamma(g.shape[2] + 2, unit)) * (1 + gamma(a.shape[1], UNIT_ROUNDOFF[torch.float64]))
    error = g_error * (1 + gamma(a.shape[2] + 2, unit)) * (1 + unit)
    return products.sum(1, dtype=torch.float64).mul_(error), g_norms.sum(1, dtype=torch.float64).mul_(g_error)


def term_mass(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Upper bounds of ``S_i = Σ_t ‖a_t‖‖g_t‖`` for a [B, T, d], g [B, T, p]: float64 [B]."""
    return term_masses(a, g)[0]


def bias_term_mass(g: torch.Tensor) -> torch.Tensor:
    """``Σ_t ‖g_t‖`` for g [B, T, p] (a bias is a weight whose input is 1): float64 [B]."""
    dtype = accumulation_dtype(g)
    error = (1 + gamma(g.shape[2] + 2, UNIT_ROUNDOFF[dtype])) * (1 + gamma(g.shape[1], UNIT_ROUNDOFF[torch.float64]))
    return torch.linalg.vector_norm(g, dim=2, dtype=dtype).sum(1, dtype=torch.float64).mul_(error)


#: elements converted to float64 at a time by the row norms below (512 KiB): no float64 copy of a whole tensor
FLOAT64_CHUNK_NUMEL = 1 << 16


def _float64_row_norms(x: torch.Tensor) -> torch.Tensor:
    """The norms of the rows ``x[i]`` (any layout: no reshape copy) summed in float64, a chunk of rows at a
    time: float64 [B]."""
    if x.dim() == 1:  # one number per sample (a scalar parameter)
        return x.abs().double()
    dims = tuple(range(1, x.dim()))
    step = max(1, FLOAT64_CHUNK_NUMEL // max(1, math.prod(x.shape[1:])))
    if step >= x.shape[0]:
        return torch.linalg.vector_norm(x, dim=dims, dtype=torch.float64)
    return torch.cat([
        torch.linalg.vector_norm(x[start : start + step], dim=dims, dtype=torch.float64)
        for start in range(0, x.shape[0], step)
    ])


def row_sq_sums_float64(x: torch.Tensor) -> torch.Tensor:
    """``Σ_j x_ij²`` of the rows of ``x [B, n]``, squares and sums in float64 (a chunk of rows converted at a
    time): float64 [B]."""
    step = max(1, FLOAT64_CHUNK_NUMEL // max(1, x.shape[1]))
    if step >= x.shape[0]:
        return x.double().pow_(2).sum(1)
    return torch.cat([x[start : start + step].double().pow_(2).sum(1) for start in range(0, x.shape[0], step)])


def row_norms_float64(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the row norms of ``x [B, d]`` computed in float64: float64 [B]."""
    return _float64_row_norms(x) * (1 + gamma(x.shape[1] + 3, UNIT_ROUNDOFF[torch.float64]))


def product_norm_sq_upper(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``‖a_i‖²‖g_i‖²`` (a [B, d], g [B, p]: the norm² of the outer product g_i ⊗ a_i, one position),
    with both norms in float64: float64 [B], an upper bound by the float64 rounding alone."""
    return (row_norms_float64(a) * row_norms_float64(g)).square() * BOUND_ARITHMETIC


# -- upper bounds of per-sample norms ----------------------------------------------------------
def ghost_norm_sq_upper(
    value: torch.Tensor, mass: torch.Tensor, gram_error_a: float, gram_error_g: float, sum_error: float
) -> torch.Tensor:
    """Bound ``‖G_i‖²`` from its Gram form ``value = Σ_{t,s} A_ts B_ts`` (float64, updated in place), A ≈ a aᵀ
    and B ≈ g gᵀ computed with entry errors ``gram_error_* · ‖x_t‖‖x_s‖``, the products and their sum
    (of positions² terms) with relative error ``sum_error``: ``|value - ‖G‖²| ≤ θ S²``."""
    theta = (1 + gram_error_a) * (1 + gram_error_g) * (1 + sum_error) - 1
    return value.clamp_(min=0).addcmul_(mass, mass, value=theta).mul_(BOUND_ARITHMETIC)


def direct_norm_sq_upper(frobenius_sq: torch.Tensor, mass: torch.Tensor, entry_error: float, sum_error: float) -> torch.Tensor:
    """Bound ``‖G_i‖²`` from ``frobenius_sq`` (float64, updated in place), the squared norm of a computed
    ``G̃_i`` whose entries are within ``entry_error · Σ_t |g_t||a_t|`` of exact (so ``‖G̃ - G‖ ≤
    entry_error·S``; ``entry_error`` a number or one per sample), summed with relative error
    ``sum_error``: ``(‖G̃‖ + entry_error·S)²``."""
    norms = frobenius_sq.clamp_(min=0).mul_(1 + sum_error).sqrt_()
    norms = norms.addcmul_(entry_error, mass) if isinstance(entry_error, torch.Tensor) else norms.add_(mass, alpha=entry_error)
    return norms.square_().mul_(BOUND_ARITHMETIC)


def cross_inner_upper(value: torch.Tensor, mass_1: torch.Tensor, mass_2: torch.Tensor, error: float) -> torch.Tensor:
    """Bound ``<G_i, G'_i>`` (of two uses of one parameter) from its computed value: ``+ error·S·S'``."""
    return value + (error + 2.0**-48) * mass_1 * mass_2  # |value| ≤ (1 + error) S S': its own rounding too


def norm_sq_upper(x: torch.Tensor) -> torch.Tensor:
    """Upper bounds of ``‖x_i‖²`` for a materialised ``x [B, ...]``, float64 [B]: squares summed in float64
    (a chunk of samples at a time, so no float64 copy of the whole tensor)."""
    out = _float64_row_norms(x).square_()
    return out.mul_((1 + gamma(math.prod(x.shape[1:]) + 3, UNIT_ROUNDOFF[torch.float64])) * BOUND_ARITHMETIC)


# -- slack of the clipped sums -------------------------------------------------------------------
def _fp32_operand_roundoff(device: torch.device, kind: str) -> float:
    """How much a GEMM ("matmul") or cuDNN convolution ("conv") may round fp32 operands."""
    if kind == "conv":
        return TF32_ROUNDOFF if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else 0.0
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return UNIT_ROUNDOFF[torch.bfloat16]
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return TF32_ROUNDOFF
    return 0.0


def product_error(dtype: torch.dtype, device: torch.device, kind: str = "matmul") -> float:
    """The relative error bound of one term ``c·g_t ⊗ a_t`` as a clipped sum computes it from inputs of
    ``dtype``: c and c·g rounded to dtype (bf16/fp16), then (fp32) both GEMM operands rounded (TF32)."""
    scaling = UNIT_ROUNDOFF[dtype] if dtype in (torch.bfloat16, torch.float16) else 0.0
    operands = _fp32_operand_roundoff(device, kind) if dtype == torch.float32 else 0.0
    return (1 + scaling) ** 2 * (1 + operands) ** 2 - 1


def clipped_sum_error(dtype: torch.dtype, device: torch.device, positions, rows: int, kind: str = "matmul"):
    """κ: a bound, relative to ``c_i S_i``, on how far sample i's part of a clipped sum as computed lies
    from ``c_i G_i``: the products (``product_error``; for fp32 also the Triton kernels' tf32x3) and the
    reduction over ``rows`` rows, of which the sample's ``positions`` (an int, or a tensor of one count
    per sample) are contiguous (module docstring), accumulated in float32 (float64) by any kernel, those
    whose tensor cores truncate included (unit 2u)."""
    products = product_error(dtype, device, kind)
    if dtype == torch.float32:
        products = (1 + products) * (1 + TF32X3_PRODUCT_ERROR) - 1
    unit = 2 * UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    depth = positions + 2 * math.ceil(math.log2(max(rows, 2))) + 2
    return (1 + products) * (1 + gamma(depth, unit)) - 1


def sequence_slack(a: torch.Tensor, g: torch.Tensor, kappa: float) -> torch.Tensor:
    """``κ S_i`` per sample, float64 [B], for a [B, T, d] and g [B, T, p]."""
    return kappa * term_mass(a, g)


def bias_slack(g: torch.Tensor, kappa: float) -> torch.Tensor:
    """``κ Σ_t ‖g_t‖`` per sample for g [B, T, p]: a bias's clipped sum is the weight's with inputs 1."""
    return kappa * bias_term_mass(g)


def conv_term_mass(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, dilation, groups: int) -> torch.Tensor:
    """Upper bounds of ``Σ_{t, group} ‖g_t‖‖patch_t‖`` per sample, float64 [B], for a convolution's
    (padded) input x [B, C_in, *] and output gradient g [B, C_out, *out]: its weight gradient is a
    GEMM over the patches (one per output position and group). Patch norms come from one small
    convolution of x² (no unfold)."""
    batch, in_channels = x.shape[:2]
    dtype = accumulation_dtype(x, g)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel_size) - 1]
    ones = torch.ones((groups, in_channels // groups, *kernel_size), dtype=dtype, device=x.device)
    with ieee_fp32():
        patch_sq = conv(x.to(dtype).square(), ones, stride=stride, dilation=dilation, groups=groups)  # [B, groups, *out]
    g_sq = g.to(dtype).square().reshape(batch, groups, g.shape[1] // groups, -1).sum(2)
    unit = UNIT_ROUNDOFF[dtype]
    products = (patch_sq.flatten(2).clamp(min=0).sqrt() * g_sq.clamp(min=0).sqrt()).flatten(1)
    error = (
        (1 + gamma(in_channels // groups * math.prod(kernel_size) + 2, unit)) * (1 + gamma(g.shape[1] // groups + 2, unit))
        * (1 + unit) * (1 + gamma(products.shape[1], UNIT_ROUNDOFF[torch.float64]))
    )
    return products.sum(1, dtype=torch.float64) * error


def conv_slack(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, dilation, groups: int, kappa: float) -> torch.Tensor:
    """``κ Σ_{t, group} ‖g_t‖‖patch_t‖`` per sample, float64 [B] (see ``conv_term_mass``)."""
    return kappa * conv_term_mass(x, g, kernel_size, stride, dilation, groups)


@contextmanager
def ieee_fp32():
    """fp32 matmuls and cuDNN convolutions without TF32 inside (the global settings, restored after):
    per-sample norms decide the clip factors, and their error bounds assume IEEE fp32 products."""
    precision = torch.get_float32_matmul_precision()
    conv_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv_tf32
        torch.set_float32_matmul_precision(precision)
