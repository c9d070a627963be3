"""What a layer rule is: per-sample gradient information from (layer input, output gradient).

The engine records, for every ruled module call, the module's positional inputs and
the gradient of the loss with respect to its output, both batch-first. A rule turns
them into what one DP step needs without ever forming the non-private gradient:

- ``norm_sq``: each sample's squared gradient norm over the module's trainable
  parameters, ``[B]`` in float32;
- ``clipped_grad``: ``sum_i c_i * grad_i`` for each trainable parameter;
- ``grad_sample``: the materialised per-sample gradients ``[B, *p.shape]`` (hooks
  mode, tests, and the generic fallback for the two methods above).

``grad_output`` is the gradient of the *summed* per-sample losses (the engine undoes
a mean reduction before calling the rule). Frozen parameters (``requires_grad=False``)
never appear in any result.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn


class LayerRule:
    """Base class. A minimal rule implements only ``grad_sample``."""

    #: module classes this rule handles (used by ``register_rule``)
    module_types: Tuple[type, ...] = ()

    def trainable_params(self, module: nn.Module) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def prefers_grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> bool:
        """True when materialising this call's per-sample gradients once (then deriving the norm and
        the clipped sum from them) is cheaper than ``norm_sq`` + ``clipped_grad``: tiny per-sample
        gradients (norm layers), or shapes where they are no larger than the activations."""
        return False

    def check(self, module: nn.Module) -> None:
        """Raise a one-line ValueError if this module's configuration cannot be made private."""

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def norm_sq(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> torch.Tensor:
        grads = self.grad_sample(module, inputs, grad_output)
        return sum(g.flatten(1).float().pow(2).sum(1) for g in grads.values())

    def clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        grads = self.grad_sample(module, inputs, grad_output)
        return {n: torch.einsum("b,b...->...", clip_factors.to(g.dtype), g) for n, g in grads.items()}
