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
    if x.numel() == 0:  # var_mean warns on empty reductions
        return x.new_zeros((B, C), dtype=dtype)
    blocks = x.to(dtype).reshape(B, M, num_groups, C // num_groups * S)
    if rms:
        x_hat = blocks * torch.rsqrt(blocks.square().mean(-1, keepdim=True) + eps)
    else:
        var, mean = torch.var_mean(blocks, dim=-1, correction=0, keepdim=True)
        x_hat = (blocks - mean) * torch.rsqrt(var + eps)
    return torch.einsum("bmcs,bmcs->bc", grad.to(dtype), x_hat.reshape(B, M, C, S))
