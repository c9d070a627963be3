"""nn.Conv1d/2d/3d: pad the input as the module does, then fastdp.ops.conv on the padded input."""

from __future__ import annotations

import math

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import conv as conv_ops
from ...ops import linear as linear_ops
from ...ops import rounding, uses_torch_reference
from . import register_rule
from .base import ClipFactors, LayerRule, factors_for
from .linear import common_dtype

#: conv padding_mode -> F.pad mode
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _padding_pairs(module: nn.modules.conv._ConvNd) -> List[Tuple[int, int]]:
    """(left, right) padding per spatial dim, as the module's forward applies it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":  # torch puts the odd extra element on the right
        totals = [dil * (size - 1) for dil, size in zip(module.dilation, module.kernel_size)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(pad, pad) for pad in module.padding]


def padded_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    pairs = _padding_pairs(module)
    if not any(left or right for left, right in pairs):
        return x
    flat = [amount for pair in reversed(pairs) for amount in pair]  # F.pad wants the last dim first
    return F.pad(x, flat, mode=_PAD_MODES[module.padding_mode])


def _weight_call_inputs(module: nn.modules.conv._ConvNd, x: torch.Tensor, grad_output: torch.Tensor):
    """``(x, g, padding)`` in one dtype for a weight-gradient call: x as recorded and the padding the call
    applies itself (zeros mode, the same padding on both sides of each dim), else x padded and None."""
    pairs = _padding_pairs(module)
    if module.padding_mode == "zeros" and all(left == right for left, right in pairs):
        padding = [left for left, _ in pairs]
    else:
        x, padding = padded_input(module, x), None
    return (*common_dtype(x, grad_output), padding)


class ConvRule(LayerRule):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def check(self, module: nn.modules.conv._ConvNd) -> None:
        if module.padding_mode not in _PAD_MODES:
            raise ValueError(
                f"{type(module).__name__} has padding_mode={module.padding_mode!r}, which fastdp cannot "
                f"make private; use one of {sorted(_PAD_MODES)}"
            )

    @staticmethod
    def _geometry(module: nn.modules.conv._ConvNd) -> tuple:
        return module.kernel_size, module.stride, module.dilation, module.groups

    def prefers_grad_sample(self, module, inputs: tuple, grad_output: torch.Tensor) -> bool:
        """Materialise where the linear cost model says so for the unfolded layer, and only where the per-sample
        weight gradients are no larger than the sample's input and output gradient themselves (the unfolded
        patches the model compares with are k^d times the input, and are never stored)."""
        positions = math.prod(grad_output.shape[2:])
        group_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        group_out = module.out_channels // module.groups
        held = inputs[0][0].numel() + grad_output[0].numel() if grad_output.shape[0] else 0
        return (
            module.weight.numel() <= held
            and linear_ops.materialising_is_cheaper(positions, group_in, group_out)
            and uses_torch_reference("conv_weight_norm_sq", inputs[0], grad_output)
        )

    def norm_sq_per_param(self, module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        norms = {}
        if module.weight.requires_grad:
            x = padded_input(module, inputs[0])
            norms["weight"] = conv_ops.conv_weight_norm_sq(x, grad_output, *self._geometry(module))
        if module.bias is not None and module.bias.requires_grad:
            norms["bias"] = linear_ops.linear_bias_norm_sq(grad_output.flatten(2).mT)
        return norms

    def clipped_grad(
        self, module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        grads = {}
        if module.weight.requires_grad:
            x, g, padding = _weight_call_inputs(module, inputs[0], grad_output)
            factors = factors_for(clip_factors, "weight")
            weight_grad = conv_ops.conv_weight_clipped_grad(
                x, g, factors, *self._geometry(module), module.weight, padding
            )
            grads["weight"] = weight_grad.to(module.weight.dtype)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = self._bias_clipped_grad(module, grad_output, clip_factors)
        return grads

    def add_clipped_grad(self, module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors, out) -> None:
        """As ``clipped_grad``, the weight's sum added into ``out`` a block of output channels at a time
        (``conv_ops.add_conv_weight_clipped_grad``): no whole weight-sized result beside ``out``."""
        if "weight" in out:
            x, g, padding = _weight_call_inputs(module, inputs[0], grad_output)
            conv_ops.add_conv_weight_clipped_grad(
                out["weight"], x, g, factors_for(clip_factors, "weight"), *self._geometry(module), module.weight,
                padding,
            )
        if "bias" in out:
            out["bias"].add_(self._bias_clipped_grad(module, grad_output, clip_factors))

    @staticmethod
    def _bias_clipped_grad(module, grad_output: torch.Tensor, clip_factors: ClipFactors) -> torch.Tensor:
        factors = factors_for(clip_factors, "bias")
        return linear_ops.linear_bias_clipped_grad(grad_output.flatten(2).mT, factors).to(module.bias.dtype)

    def rounding_slack(self, module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        x, g = common_dtype(inputs[0], grad_output)
        positions = math.prod(g.shape[2:])
        slack = {}
        if module.weight.requires_grad:
            kappa = rounding.clipped_sum_error(g.dtype, g.device, positions, g.shape[0] * positions, kind="conv")
            slack["weight"] = rounding.conv_slack(padded_input(module, x), g, *self._geometry(module), kappa)
        if module.bias is not None and module.bias.requires_grad:  # the bias's clipped sum is a matrix product
            kappa = rounding.clipped_sum_error(g.dtype, g.device, positions, g.shape[0] * positions)
            slack["bias"] = rounding.bias_slack(g.flatten(2).mT, kappa)
        return slack

    def grad_sample(self, module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        grads = {}
        if module.weight.requires_grad:
            if uses_torch_reference("conv_weight_grad_sample", inputs[0], grad_output):
                x, g, padding = _weight_call_inputs(module, inputs[0], grad_output)
                if padding is not None:  # the weight-gradient call pads x itself: no padded copy
                    weight_grads = conv_ops.conv_weight_grad_sample_zero_padded(x, g, *self._geometry(module), padding)
                else:
                    weight_grads = conv_ops.conv_weight_grad_sample(x, g, *self._geometry(module))
            else:  # the kernels take the padded input
                x, g = common_dtype(padded_input(module, inputs[0]), grad_output)
                weight_grads = conv_ops.conv_weight_grad_sample(x, g, *self._geometry(module))
            grads["weight"] = weight_grads.to(module.weight.dtype)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = grad_output.flatten(2).sum(2).to(module.bias.dtype)
        return grads


register_rule(ConvRule())
