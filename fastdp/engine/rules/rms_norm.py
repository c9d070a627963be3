"""Rule for nn.RMSNorm: LayerNorm's view, x̂ = x / sqrt(mean(x²) + eps), weight only."""

from __future__ import annotations

import torch
from torch import nn

from . import register_rule
from .layer_norm import LayerNormRule


class RMSNormRule(LayerNormRule):
    module_types = (nn.RMSNorm,)
    rms = True

    def eps(self, module: nn.RMSNorm, x: torch.Tensor) -> float:
        """eps=None means torch's default: the machine epsilon of the compute dtype (float32 for low precision)."""
        if module.eps is not None:
            return module.eps
        return torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps


register_rule(RMSNormRule())
