"""Rule for nn.LayerNorm, and the base shared by every normalisation-layer rule.

A normalisation layer's per-sample gradients are small (``[B, C]`` per parameter), so all
three methods materialise them: the norm is their sum of squares and the clipped gradient a
``c``-weighted sum over the batch.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from ...ops.norms import norm_weight_grad_sample
from ...ops.rounding import norm_sq_upper
from . import register_rule
from .base import ClipFactors, LayerRule, factors_for


class AffineNormRule(LayerRule):
    """Normalisation layers with an elementwise affine ``weight`` and optional ``bias``.

    Subclasses give the ``[B, M, C, S]`` view of the input (parameters on C, see
    ``fastdp.ops.norms``), the number of statistics groups along C, and eps.
    """

    def prefers_grad_sample(self, module, inputs, grad_output) -> bool:
        return True  # [B, C]: smaller than the activations, and one x̂ recompute instead of two

    rms = False

    def view(self, module: nn.Module, x: torch.Tensor) -> Tuple[int, int, int, int]:
        raise NotImplementedError

    def num_groups(self, module: nn.Module, x: torch.Tensor) -> int:
        return 1

    def eps(self, module: nn.Module, x: torch.Tensor) -> float:
        return module.eps

    def _per_sample_grads(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Trainable parameter name → per-sample gradient ``[B, C]`` in float32 (float64 for float64)."""
        params = self.trainable_params(module)
        x = inputs[0]
        shape = self.view(module, x)
        grad = grad_output.reshape(shape)
        grads = {}
        if "weight" in params:
            grads["weight"] = norm_weight_grad_sample(
                x.reshape(shape), grad, self.num_groups(module, x), self.eps(module, x), self.rms
            )
        if "bias" in params:
            grads["bias"] = grad.sum((1, 3), dtype=torch.promote_types(grad.dtype, torch.float32))
        return grads

    def norm_sq_per_param(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        grads = self._per_sample_grads(module, inputs, grad_output)
        return {name: norm_sq_upper(grad) for name, grad in grads.items()}

    def clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        params = self.trainable_params(module)
        return {
            name: (factors_for(clip_factors, name).to(grad.dtype) @ grad).to(params[name].dtype).view(params[name].shape)
            for name, grad in self._per_sample_grads(module, inputs, grad_output).items()
        }

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        params = self.trainable_params(module)
        return {
            name: grad.to(params[name].dtype).view(grad.shape[0], *params[name].shape)
            for name, grad in self._per_sample_grads(module, inputs, grad_output).items()
        }


class LayerNormRule(AffineNormRule):
    """nn.LayerNorm: statistics and parameters over the trailing ``normalized_shape`` dims."""

    module_types = (nn.LayerNorm,)

    def view(self, module: nn.Module, x: torch.Tensor) -> Tuple[int, int, int, int]:
        normalized_dims = len(module.normalized_shape)
        leading = x.shape[1 : x.dim() - normalized_dims]
        return x.shape[0], math.prod(leading), math.prod(module.normalized_shape), 1


register_rule(LayerNormRule())
