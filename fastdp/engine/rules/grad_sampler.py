"""Opacus-style registration: a function that returns per-sample gradients becomes a rule."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn

from .base import LayerRule


class GradSamplerRule(LayerRule):
    """Wraps ``fn(layer, activations: List[Tensor], backprops: Tensor) -> {param: [B, *p.shape]}``.

    Norms and clipped sums come from the materialised per-sample gradients (LayerRule's
    defaults); write a full LayerRule for a book-keeping (non-materialising) version.
    """

    def __init__(self, fn: Callable[[nn.Module, List[torch.Tensor], torch.Tensor], Dict[nn.Parameter, torch.Tensor]]):
        self.fn = fn

    def grad_sample(self, module, inputs, grad_output):
        by_param = self.fn(module, list(inputs), grad_output)
        trainable = self.trainable_params(module)
        missing = [n for n, p in trainable.items() if p not in by_param]
        if missing:
            raise ValueError(
                f"grad sampler {getattr(self.fn, '__name__', self.fn)} returned no per-sample gradient for "
                f"{type(module).__name__}.{missing}; return one for every trainable parameter"
            )
        return {n: by_param[p] for n, p in trainable.items()}
