"""Per-sample affine gradients of normalisation layers (LayerNorm, GroupNorm, InstanceNorm, RMSNorm).

All four are one computation in the view ``x, grad: [B, M, C, S]`` with the affine parameters
on C: statistics are taken over each block of C / num_groups channels × S positions (per b, m),
and the per-sample weight gradient is ``sum over M and S of grad ⊙ x̂`` — LayerNorm/RMSNorm are
``[B, M, N, 1]`` with one group, GroupNorm ``[B, 1, C, S]`` with its groups, InstanceNorm the
same with C groups. The layer input is recorded rather than x̂, so x̂ is recomputed here as
torch does it (biased variance, ``rsqrt(var + eps)``, float32 compute for low precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import op


@op("norm_weight_grad_sample")
def norm_weight_grad_sample(
    x: torch.Tensor, grad: torch.Tensor, num_groups: int, eps: float, rms: bool
) -> torch.Tensor:
    """Per-sample weight gradients ``[B, C]`` (float32; float64 for float64 x) from x, grad ``[B, M, C, S]``.

    ``rms``: x̂ = x / sqrt(mean(x²) + eps) (RMSNorm) instead of (x - mean) / sqrt(var + eps).
    """
    B, M, C, S = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.numel() == 0:  # the normalisation kernels reject empty inputs
        return x.new_zeros((B, C), dtype=dtype)
    x_hat = normalised(x.to(dtype), num_groups, eps, rms)
    return torch.einsum("bmcs,bmcs->bc", grad.to(dtype), x_hat)


def normalised(x: torch.Tensor, num_groups: int, eps: float, rms: bool) -> torch.Tensor:
    """x̂ of ``x [B, M, C, S]`` by torch's own normalisation kernels without affine parameters,
    so it equals what the layer's forward computed (and is as fast)."""
    B, M, C, S = x.shape
    if S == 1 and num_groups == 1:  # LayerNorm / RMSNorm over the parameter dim
        rows = x.reshape(B * M, C)
        rows = F.rms_norm(rows, (C,), eps=eps) if rms else F.layer_norm(rows, (C,), eps=eps)
        return rows.reshape(B, M, C, S)
    if M == 1 and not rms:  # GroupNorm / InstanceNorm over channel groups × positions
        return F.group_norm(x.reshape(B, C, S), num_groups, eps=eps).reshape(B, M, C, S)
    raise ValueError(f"no normalisation kernel for view {tuple(x.shape)} with {num_groups} groups (rms={rms})")
