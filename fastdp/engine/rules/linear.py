"""nn.Linear: inputs [B, *, d] are flattened to the sequence view [B, T, d] of fastdp.ops.linear."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from ...ops import linear as linear_ops
from ...ops import rounding, uses_torch_reference
from . import register_rule
from .base import ClipFactors, LayerRule, NormBoundsRule, OuterFactors, factors_for


def common_dtype(a: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``g`` in one dtype for the gradient GEMMs (they differ under autocast)."""
    dtype = torch.promote_types(a.dtype, g.dtype)
    return a.to(dtype), g.to(dtype)


class LinearRule(NormBoundsRule):
    module_types = (nn.Linear,)
    #: the weight is stored [in, out] (HF Conv1D), the transpose of the gradient the GEMM forms
    weight_transposed = False

    @staticmethod
    def _sequence_view(inputs: tuple, grad_output: torch.Tensor):
        """(a [B, T, d], g [B, T, p]) with T the product of the leading non-batch dims."""
        activations = inputs[0]
        batch = activations.shape[0]
        positions = math.prod(activations.shape[1:-1])
        a = activations.reshape(batch, positions, activations.shape[-1])
        g = grad_output.reshape(batch, positions, grad_output.shape[-1])
        return a, g

    def prefers_grad_sample(self, module: nn.Linear, inputs: tuple, grad_output: torch.Tensor) -> bool:
        a, g = self._sequence_view(inputs, grad_output)
        return linear_ops.materialising_is_cheaper(a.shape[1], a.shape[2], g.shape[2]) and uses_torch_reference(
            "linear_norm_sq_direct", a, g
        )

    def norm_bounds(self, module: nn.Linear, inputs: tuple, grad_output: torch.Tensor):
        """Norm bounds and clipped-sum slack from one term mass per parameter (``fastdp.ops.rounding``)."""
        a, g = self._sequence_view(inputs, grad_output)
        kappa = rounding.clipped_sum_error(
            torch.promote_types(a.dtype, g.dtype), g.device, positions=g.shape[1], rows=g.shape[0] * g.shape[1]
        )
        weight = module.weight.requires_grad
        bias = module.bias is not None and module.bias.requires_grad
        if g.shape[1] == 1:  # one position: G_i = g_i ⊗ a_i, norm and term mass both ‖a_i‖‖g_i‖
            g_norm = rounding.row_norms_float64(g[:, 0])
            masses = {"bias": g_norm} if bias else {}
            if weight:
                masses["weight"] = rounding.row_norms_float64(a[:, 0]) * g_norm * rounding.BOUND_ARITHMETIC
            norms = {name: mass.square() * rounding.BOUND_ARITHMETIC for name, mass in masses.items()}
            return norms, {name: kappa * mass for name, mass in masses.items()}
        weight_mass, bias_mass = rounding.term_masses(a, g)
        norms, slack = {}, {}
        if weight:
            norms["weight"] = linear_ops.linear_weight_norm_sq(a, g, mass=weight_mass)
            slack["weight"] = kappa * weight_mass
        if bias:
            norms["bias"], slack["bias"] = linear_ops.linear_bias_norm_sq(g, mass=bias_mass), kappa * bias_mass
        return norms, slack


    def clipped_grad(
        self, module: nn.Linear, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        a, g = common_dtype(*self._sequence_view(inputs, grad_output))
        grads = {}
        if module.weight.requires_grad:
            weight_grad = linear_ops.linear_clipped_grad(a, g, factors_for(clip_factors, "weight"))
            grads["weight"] = weight_grad.to(module.weight.dtype)
        if module.bias is not None and module.bias.requires_grad:
            bias_grad = linear_ops.linear_bias_clipped_grad(g, factors_for(clip_factors, "bias"))
            grads["bias"] = bias_grad.to(module.bias.dtype)
        return grads

    def add_clipped_grad(self, module: nn.Linear, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors,
                         out: Dict[str, torch.Tensor]) -> None:
        """The weight's clipped sum is accumulated by the GEMM into ``out`` itself where it has the
        activations' dtype and the torch GEMM runs (``linear_ops.add_linear_clipped_grad``)."""
        a, g = common_dtype(*self._sequence_view(inputs, grad_output))
        target = out.get("weight")
        if target is not None:
            factors = factors_for(clip_factors, "weight")
            if target.dtype == a.dtype and uses_torch_reference("linear_clipped_grad", a, g):
                linear_ops.add_linear_clipped_grad(target, a, g, factors, transposed=self.weight_transposed)
            else:
                grad = linear_ops.linear_clipped_grad(a, g, factors)
                target.add_(grad.T if self.weight_transposed else grad)
        if "bias" in out:
            out["bias"].add_(linear_ops.linear_bias_clipped_grad(g, factors_for(clip_factors, "bias")))

    def outer_factors(self, module: nn.Linear, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, OuterFactors]:
        """weight [p, d]: sum_t g_t ⊗ a_t; bias [p]: sum_t g_t ⊗ 1."""
        a, g = self._sequence_view(inputs, grad_output)
        factors = {}
        if module.weight.requires_grad:
            factors["weight"] = OuterFactors(g, a)
        if module.bias is not None and module.bias.requires_grad:
            factors["bias"] = OuterFactors(g, g.new_ones(g.shape[0], g.shape[1], 1))
        return factors

    def grad_sample(self, module: nn.Linear, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        a, g = common_dtype(*self._sequence_view(inputs, grad_output))
        grads = {}
        if module.weight.requires_grad:
            grads["weight"] = linear_ops.linear_grad_sample(a, g).to(module.weight.dtype)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = g.sum(1).to(module.bias.dtype)
        return grads


register_rule(LinearRule())
