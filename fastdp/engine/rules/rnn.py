"""Recurrent layers: W_ih and W_hh as sequence-linear layers over the time steps.

For one layer and direction of an LSTM, ``gates_t = x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh``.
``fastdp.layers`` computes ``gx = x W_ihᵀ + b_ih`` for all T steps in one GEMM and marks it
with ``capture.capture_internal``: the gradient of the loss with respect to ``gx`` is the
gate gradient ``g`` of every step, so W_ih's per-sample gradient is ``g_iᵀ x_i`` and W_hh's
is ``g_iᵀ h_prev_i`` (``h_prev`` = [h_0, ..., h_{T-1}] stacked), both biases ``Σ_t g_it``:
linear layers over T, whose per-sample norms and clipped sums are the ``fastdp.ops.linear``
ops (ghost or direct by the cost model). No hook per time step, no per-step tensor per sample.

``SequenceLinearRule`` handles every such capture point: a captured tensor ``y`` [B, T, P]
described by a ``SequenceLinear`` (which parameters enter it, multiplying which recorded
input). DPMultiheadAttention's input projection and ``bias_k``/``bias_v`` use it too. The
plain ``nn.LSTM``/``nn.GRU``/``nn.RNN`` run one fused op that no capture can see into: their
rule tells the user to replace them (``ModuleValidator.fix`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ...ops import linear as linear_ops
from ...ops import rounding, uses_torch_reference
from . import register_rule
from .base import ClipFactors, LayerRule, NormBoundsRule, factors_for
from .linear import common_dtype

Span = Optional[Tuple[int, int]]  # [start, stop) of a dimension, None for all of it


@dataclass(frozen=True)
class WeightTerm:
    """Columns ``columns`` of the captured tensor receive ``a W[rows]ᵀ``, ``a`` the recorded input
    number ``input``. An input may be shorter in T than the captured tensor (attention's keys vs
    queries); the captured positions past its end must then not depend on it (zero gradient)."""

    name: str
    input: int = 0
    rows: Span = None
    columns: Span = None


@dataclass(frozen=True)
class SequenceLinear:
    """How a captured tensor ``y`` [B, T, P] depends on its module's parameters:
    ``y = Σ_terms a W[rows]ᵀ (into columns) + Σ_biases b + terms without parameters``.
    A bias may be any shape of P elements (``bias_k`` [1, 1, E] over a captured [B, 1, E]).
    Terms of one weight must fill disjoint rows. Passed to the rule as the first recorded input."""

    weights: Tuple[WeightTerm, ...] = ()
    biases: Tuple[str, ...] = ()

    def param_names(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(term.name for term in self.weights)) + self.biases


def _span(span: Span) -> slice:
    return slice(None) if span is None else slice(*span)


def _trainable(module: nn.Module, name: str) -> bool:
    param = module._parameters.get(name)
    return param is not None and param.requires_grad


class SequenceLinearRule(NormBoundsRule):
    """Per-sample norms, clipped sums and per-sample gradients of one ``capture_internal`` point.

    Recorded inputs: ``(SequenceLinear, a_0, a_1, ...)``, each ``a_j`` [B, T_j, d_j]; the output
    gradient ``g`` [B, T, P]. All batch-first (capture points record them so).
    """

    captures_internally = True

    @staticmethod
    def _terms(module: nn.Module, inputs: tuple, grad_output: torch.Tensor):
        """(term, a [B, T', d], g [B, T', p]) for each weight term of a trainable parameter."""
        spec, activations = inputs[0], inputs[1:]
        for term in spec.weights:
            if _trainable(module, term.name):
                a = activations[term.input]
                yield term, a, grad_output[:, : a.shape[1], _span(term.columns)]

    def prefers_grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> bool:
        terms = list(self._terms(module, inputs, grad_output))
        return bool(terms) and all(
            linear_ops.materialising_is_cheaper(a.shape[1], a.shape[2], g.shape[2])
            and uses_torch_reference("linear_norm_sq_direct", a, g)
            for _, a, g in terms
        )

    def norm_bounds(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor):
        """Norm bounds and clipped-sum slack from one term mass per term (``fastdp.ops.rounding``); terms
        of one weight fill disjoint rows, so their norms and slacks add."""
        norms: Dict[str, torch.Tensor] = {}
        slack: Dict[str, torch.Tensor] = {}

        def add(name, norm_sq, part):
            norms[name] = norm_sq if name not in norms else norms[name] + norm_sq
            slack[name] = part if name not in slack else slack[name] + part

        for term, a, g in self._terms(module, inputs, grad_output):
            mass = rounding.term_mass(a, g)
            add(term.name, linear_ops.linear_weight_norm_sq(a, g, mass=mass), self._kappa(a, g) * mass)
        biases = [name for name in inputs[0].biases if _trainable(module, name)]
        if biases:  # every bias gets Σ_t g
            mass = rounding.bias_term_mass(grad_output)
            bias_norm_sq = linear_ops.linear_bias_norm_sq(grad_output, mass=mass)
            for name in biases:
                add(name, bias_norm_sq, self._kappa(grad_output, grad_output) * mass)
        return norms, slack

    @staticmethod
    def _kappa(a: torch.Tensor, g: torch.Tensor) -> float:
        dtype = torch.promote_types(a.dtype, g.dtype)
        return rounding.clipped_sum_error(dtype, g.device, positions=g.shape[1], rows=g.shape[0] * g.shape[1])



    def clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        grads: Dict[str, torch.Tensor] = {}
        for term, a, g in self._terms(module, inputs, grad_output):
            param = module._parameters[term.name]
            a, g = common_dtype(a, g)
            part = linear_ops.linear_clipped_grad(a, g, factors_for(clip_factors, term.name)).to(param.dtype)
            if term.rows is None:
                grads[term.name] = part
            else:
                grads.setdefault(term.name, param.new_zeros(param.shape))[_span(term.rows)] = part
        for name in inputs[0].biases:
            if _trainable(module, name):
                param = module._parameters[name]
                bias_grad = linear_ops.linear_bias_clipped_grad(grad_output, factors_for(clip_factors, name))
                grads[name] = bias_grad.reshape(param.shape).to(param.dtype)
        return grads

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch = grad_output.shape[0]
        grads: Dict[str, torch.Tensor] = {}
        for term, a, g in self._terms(module, inputs, grad_output):
            param = module._parameters[term.name]
            part = linear_ops.linear_grad_sample(*common_dtype(a, g)).to(param.dtype)
            if term.rows is None:
                grads[term.name] = part
            else:
                grads.setdefault(term.name, param.new_zeros((batch, *param.shape)))[:, _span(term.rows)] = part
        for name in inputs[0].biases:
            if _trainable(module, name):
                param = module._parameters[name]
                grads[name] = grad_output.sum(1).reshape(batch, *param.shape).to(param.dtype)
        return grads


SEQUENCE_LINEAR_RULE = SequenceLinearRule()


class ReplaceWithDPLayerRule(LayerRule):
    """For torch layers whose forward is one opaque op (cuDNN LSTM, fused attention): no capture can
    see the per-step gradients inside, so training them privately needs the ``fastdp.layers`` twin."""

    def __init__(self, replacement: str):
        self.replacement = replacement

    def check(self, module: nn.Module) -> None:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            raise ValueError(
                f"{type(module).__name__} runs as one fused op whose per-sample gradients fastdp cannot "
                f"capture; replace it with fastdp.layers.{self.replacement} (same arguments and state_dict)"
            )

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        self.check(module)
        return {}


for _module_type, _replacement in ((nn.LSTM, "DPLSTM"), (nn.GRU, "DPGRU"), (nn.RNN, "DPRNN")):
    register_rule(ReplaceWithDPLayerRule(_replacement), _module_type)
