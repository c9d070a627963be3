"""Hugging Face's ``Conv1D`` (GPT-2, GPT, ...): a linear layer stored transposed, y = x W + b with W [in, out].

Its per-sample weight gradient is the transpose of nn.Linear's (``a_iᵀ g_i`` instead of
``g_iᵀ a_i``), so norms are the linear ones and gradients are the linear ones transposed.
Registered by class name: fastdp never imports transformers.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from . import register_rule_by_name
from .base import ClipFactors, OuterFactors
from .linear import LinearRule

HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def _transposed_weight(grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if "weight" in grads:
        grads["weight"] = grads["weight"].transpose(-1, -2).contiguous()
    return grads


class HFConv1DRule(LinearRule):
    """nn.Linear's rule with the weight gradient transposed to Conv1D's [in, out] layout."""

    module_types = ()
    weight_transposed = True

    def clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        return _transposed_weight(super().clipped_grad(module, inputs, grad_output, clip_factors))

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        return _transposed_weight(super().grad_sample(module, inputs, grad_output))

    def outer_factors(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, OuterFactors]:
        """weight [in, out]: sum_t a_t ⊗ g_t (the transpose of nn.Linear's); bias as nn.Linear's."""
        factors = super().outer_factors(module, inputs, grad_output)
        if "weight" in factors:
            g, a = factors["weight"]
            factors["weight"] = OuterFactors(a, g)
        return factors


register_rule_by_name(HFConv1DRule(), HF_CONV1D)
