"""Rule for nn.GroupNorm: input [B, C, *], statistics per sample over each group of channels."""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from . import register_rule
from .layer_norm import AffineNormRule


class GroupNormRule(AffineNormRule):
    module_types = (nn.GroupNorm,)

    def view(self, module: nn.Module, x: torch.Tensor) -> Tuple[int, int, int, int]:
        return x.shape[0], 1, x.shape[1], math.prod(x.shape[2:])

    def num_groups(self, module: nn.GroupNorm, x: torch.Tensor) -> int:
        return module.num_groups


register_rule(GroupNormRule())
