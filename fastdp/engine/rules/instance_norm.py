"""Rule for nn.InstanceNorm1d/2d/3d (affine=True): GroupNorm with one group per channel."""

from __future__ import annotations

import torch
from torch import nn

from . import register_rule
from .group_norm import GroupNormRule


class InstanceNormRule(GroupNormRule):
    module_types = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

    def check(self, module: nn.Module) -> None:
        if module.track_running_stats:
            raise ValueError(
                f"{type(module).__name__}(track_running_stats=True) keeps running statistics averaged "
                "over the batch, which leak other samples' data into each output; set track_running_stats=False"
            )

    def num_groups(self, module: nn.Module, x: torch.Tensor) -> int:
        return x.shape[1]


register_rule(InstanceNormRule())
