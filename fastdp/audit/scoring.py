"""Canary scores: higher means "more likely in the training set".

- gradient canaries (white-box): the projection of the model's total update on canary j's
  direction, ``(w_before - w_after)[j]``, in units of one clipped contribution (``lr·C/E[B]`` for
  plain SGD): about "steps in which canary j was sampled" plus Gaussian noise of std σ·√steps.
- input canaries (loss-based): how much training lowered canary j's loss (before minus after),
  so a canary that was easy from the start does not look memorised.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn


def gradient_canary_scores(weights_before: torch.Tensor, weights_after: torch.Tensor, *, lr: float,
                           max_grad_norm: float, expected_batch_size: float) -> np.ndarray:
    """Score [m] of Dirac gradient canaries trained with plain SGD (no momentum, no weight decay),
    whose update of a canary weight is ``-lr · (clipped contributions + noise) / E[B]``."""
    unit = lr * max_grad_norm / expected_batch_size
    return ((weights_before - weights_after).double() / unit).numpy()


@torch.no_grad()
def per_sample_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      criterion: Callable[..., torch.Tensor], batch_size: int = 1024) -> torch.Tensor:
    """criterion(model(x), y, reduction="none") in batches, in evaluation mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([
            criterion(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="none").float()
            for i in range(0, len(x), batch_size)
        ])
    finally:
        model.train(was_training)


def input_canary_scores(losses_before: torch.Tensor, losses_after: torch.Tensor) -> np.ndarray:
    """Score [m] of input canaries: the drop of each canary's loss over training."""
    return (losses_before - losses_after).double().numpy()
