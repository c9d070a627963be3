"""Opacus's import path ``opacus.optimizers.utils``."""

from typing import List

from torch import nn
from torch.optim import Optimizer


def params(optimizer: Optimizer) -> List[nn.Parameter]:
    """The trainable parameters of all of ``optimizer``'s param groups, in order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
