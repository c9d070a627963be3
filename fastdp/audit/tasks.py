"""Built-in tiny tasks for ``fastdp audit`` and the tests: synthetic data and small models.

The gradient-canary audit does not depend on what the model learns (no real sample touches the
canary weights), so a small synthetic task is enough to exercise the whole DP step.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

MODELS = ("linear", "mlp")


def synthetic_classification(num_samples: int, features: int, classes: int, seed: int) -> TensorDataset:
    """Gaussian inputs labelled by a random linear map (learnable, so the model's own gradients are
    not just noise)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, features, generator=generator)
    y = (x @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
    return TensorDataset(x, y)


def make_model(name: str, features: int, classes: int, seed: int, hidden: int = 32) -> nn.Module:
    """``"linear"``: one Linear layer; ``"mlp"``: Linear-Tanh-Linear with ``hidden`` units."""
    torch.manual_seed(seed)
    if name == "linear":
        return nn.Linear(features, classes)
    if name == "mlp":
        return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def tiny_task(model: str = "mlp", num_samples: int = 1000, features: int = 16, classes: int = 4,
              seed: int = 0) -> Tuple[nn.Module, TensorDataset]:
    """A (model, dataset) pair for an audit."""
    return make_model(model, features, classes, seed), synthetic_classification(num_samples, features, classes, seed)
