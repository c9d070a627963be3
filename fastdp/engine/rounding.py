"""Rounding in the clipped sums, bounded so that each sample's contribution *as computed* is ≤ C.

A rule forms ``sum_i c_i G_i`` without materialising ``G_i = sum_t g_t ⊗ a_t``: for a linear
layer one GEMM over the rows of ``(c ⊙ g)`` and ``a``. In bf16/fp16 the factor c and each
product c·g_t are rounded to that format; for fp32 inputs a GEMM or convolution may round its
operands to TF32 (or to bf16 under ``torch.set_float32_matmul_precision("medium")``). Each
rounded term is within κ·c‖g_t‖‖a_t‖ of ``c g_t ⊗ a_t``, but across the T positions of one
sample these errors need not cancel the way the terms do, so the computed contribution can
exceed ``c‖G_i‖`` by ``κ c Σ_t ‖g_t‖‖a_t‖`` — unbounded relative to ‖G_i‖ when terms cancel.
A rule therefore reports that slack, ``s_i = κ Σ_t ‖g_t‖‖a_t‖`` per parameter
(``LayerRule.rounding_slack``), and the engine clips with the norm ``‖G_i‖ + s_i``: what is
summed is then at most ``c (‖G_i‖ + s_i) ≤ C``.

The norms themselves are computed in IEEE fp32 (``ieee_fp32``): under TF32 a norm could come out
too small, and the factor too large.

Conventions: fp32 arithmetic (accumulation, and Triton's tf32x3 dots) counts as exact, as it
does everywhere else; the final rounding of the whole batch's sum to the parameter's dtype is
not per-sample and is not counted.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

#: unit roundoff (half the spacing of the numbers in [1, 2)) of the formats the products are rounded to
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TF32_ROUNDOFF = 2.0**-11


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
    """κ: the relative error bound of one term ``c·g_t ⊗ a_t`` as the clipped sum computes it from
    inputs of ``dtype``: c and c·g rounded to dtype, then (fp32) both GEMM operands rounded."""
    scaling = UNIT_ROUNDOFF.get(dtype, 0.0)
    operands = _fp32_operand_roundoff(device, kind) if dtype == torch.float32 else 0.0
    return (1 + scaling) ** 2 * (1 + operands) ** 2 - 1


def sequence_slack(a: torch.Tensor, g: torch.Tensor, kappa: float) -> torch.Tensor:
    """``κ Σ_t ‖g_t‖‖a_t‖`` per sample, float32 [B], for a [B, T, d] and g [B, T, p]."""
    a_norms = torch.linalg.vector_norm(a, dim=2, dtype=torch.float32)
    g_norms = torch.linalg.vector_norm(g, dim=2, dtype=torch.float32)
    return kappa * (a_norms * g_norms).sum(1)


def bias_slack(g: torch.Tensor, kappa: float) -> torch.Tensor:
    """``κ ‖Σ_t g_t‖`` per sample for g [B, T, p]: a bias's clipped sum rounds each sample's own sum
    (once) and its factor, relative errors of that sum, not of the terms."""
    return kappa * torch.linalg.vector_norm(g.sum(1, dtype=torch.float32), dim=1)


def conv_slack(x: torch.Tensor, g: torch.Tensor, kernel_size, stride, dilation, groups: int, kappa: float) -> torch.Tensor:
    """``κ Σ_{t, group} ‖g_t‖‖patch_t‖`` per sample for a convolution's (padded) input x [B, C_in, *]
    and output gradient g [B, C_out, *out]: the weight gradient is a GEMM over the patches."""
    batch, in_channels = x.shape[:2]
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(kernel_size) - 1]
    ones = torch.ones((groups, in_channels // groups, *kernel_size), dtype=torch.float32, device=x.device)
    patch_sq = conv(x.float().square(), ones, stride=stride, dilation=dilation, groups=groups)  # [B, groups, *out]
    g_sq = g.float().square().reshape(batch, groups, g.shape[1] // groups, -1).sum(2)
    return kappa * (patch_sq.flatten(2).clamp(min=0).sqrt() * g_sq.sqrt()).sum((1, 2))


@contextmanager
def ieee_fp32():
    """fp32 matmuls and cuDNN convolutions without TF32 inside (the global settings, restored after):
    per-sample norms decide the clip factors, so they must not be rounded to TF32's 10-bit mantissa."""
    precision = torch.get_float32_matmul_precision()
    conv_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv_tf32
        torch.set_float32_matmul_precision(precision)
