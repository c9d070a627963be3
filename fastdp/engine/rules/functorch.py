"""Fallback for any module with trainable parameters and no rule: per-sample grads by torch.func.

Exact but materialising (``[B, *p.shape]`` per parameter) and one vmapped forward
recompute per call; register a rule for a layer type that matters for speed.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .base import LayerRule


class FunctorchRule(LayerRule):
    """Per-sample gradients of ``<module(x_i), g_i>`` by vmap over samples of ``grad``."""

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        params = self.trainable_params(module)
        names = list(params)

        def sample_loss(values, sample_inputs, sample_grad):
            batched = tuple(x.unsqueeze(0) if isinstance(x, torch.Tensor) else x for x in sample_inputs)
            output = functional_call(module, dict(zip(names, values)), batched)
            return (output * sample_grad.unsqueeze(0)).sum()

        if grad_output.shape[0] == 0:
            return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        input_dims = tuple(0 if isinstance(x, torch.Tensor) else None for x in inputs)
        with torch.enable_grad():
            grads = vmap(grad(sample_loss), in_dims=(None, input_dims, 0))(
                tuple(p.detach() for p in params.values()), inputs, grad_output
            )
        return dict(zip(names, grads))


FUNCTORCH_RULE = FunctorchRule()
