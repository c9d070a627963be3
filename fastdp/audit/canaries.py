"""Canaries for one-run auditing: m extra training samples, each included with probability ½.

Two kinds (Steinke, Nasr, Jagielski 2023, §6-7):

- **gradient** (default, white-box, the tightest): canary j is a sample whose gradient is a Dirac
  vector, non-zero only in its own coordinate j of a dedicated parameter. It is built from the
  public API with no engine change: the audited model is wrapped in ``GradientCanaryModel``,
  which adds an ``nn.Embedding(m + 1, 1, padding_idx=0)``. Canary j looks up row j + 1 and its
  loss is ``gradient_norm · w[j + 1]``, so its whole per-sample gradient is
  ``gradient_norm · e_{j+1}`` (zero on the model's own parameters); real samples look up the
  padding row and leave ``w`` untouched. The canary then goes through everything a real sample
  goes through — Poisson sampling by ``DPDataLoader``, the engine's per-sample norm and flat clip
  (over all parameters), the optimizer's noise — and, since no real sample touches ``w``, the
  change of ``w[j + 1]`` is exactly the canary's clipped contributions plus noise: the auditor's
  score. ``gradient_norm`` is above the clipping bound (``CANARY_NORM_MULTIPLE · C``), so a
  missing clip shows as a leak instead of passing unnoticed.
- **input** (black-box, loss-based): canary j is an input drawn at random with a random label;
  its score is how much training lowered its loss. Much weaker on small models (memorising a
  random point takes many steps), but it needs nothing from the model.

Inclusion is drawn with numpy's generator from the audit seed, independently of everything the
training run does, as the theorem requires.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

#: a gradient canary's raw gradient norm, in units of the clipping bound C: clipping must cut it to C
CANARY_NORM_MULTIPLE = 10.0
KINDS = ("gradient", "input")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def draw_inclusions(num_canaries: int, seed: int) -> np.ndarray:
    """Bool array [m]: canary j is in the training set (each independently, probability ½)."""
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 1:
        raise ValueError(f"canaries must be a whole number >= 1, got {num_canaries!r}")
    return np.random.default_rng([seed, 0xCA7A]).random(num_canaries) < 0.5


class GradientCanaryModel(nn.Module):
    """``model`` plus one scalar weight per gradient canary; ``forward(x, canary_id)`` returns
    ``(model(x), canary_output)`` with ``canary_output[i] = gradient_norm · w[canary_id[i]]``.

    ``canary_id`` is 0 for a real sample (the padding row: zero output, never updated) and j + 1
    for canary j. ``per_sample_loss`` combines the two outputs so that a real sample's loss is
    its ordinary loss and canary j's loss is its canary output."""

    def __init__(self, model: nn.Module, num_canaries: int, gradient_norm: float):
        super().__init__()
        self.model = model
        self.canary = nn.Embedding(num_canaries + 1, 1, padding_idx=0)
        nn.init.zeros_(self.canary.weight)
        self.gradient_norm = float(gradient_norm)

    def forward(self, x: torch.Tensor, canary_id: torch.Tensor):
        return self.model(x), self.canary(canary_id).squeeze(-1) * self.gradient_norm

    def canary_weights(self) -> torch.Tensor:
        """w[1:], one entry per canary (a copy)."""
        return self.canary.weight.detach()[1:, 0].clone()


class AuditDataset(Dataset):
    """The training set of one audit: every real sample ``(x, y, 0)`` and each *included* canary
    ``(x_j, y_j, j + 1)``. For gradient canaries ``x_j`` is zeros and ``y_j`` is 0 (their loss
    ignores them)."""

    def __init__(self, real: Dataset, canary_x: torch.Tensor, canary_y: torch.Tensor, included: np.ndarray):
        self.real = real
        self.canary_x, self.canary_y = canary_x, canary_y
        self.canary_rows = np.flatnonzero(included)

    def __len__(self) -> int:
        return len(self.real) + len(self.canary_rows)

    def __getitem__(self, index: int):
        if index < len(self.real):
            x, y = self.real[index][:2]
            return x, y, torch.tensor(0)
        j = int(self.canary_rows[index - len(self.real)])
        return self.canary_x[j], self.canary_y[j], torch.tensor(j + 1)


def make_canary_samples(kind: str, example_x: torch.Tensor, example_y: torch.Tensor, num_canaries: int,
                        num_classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels [m, ...] of the canaries (zeros for gradient canaries; random inputs
    with the real inputs' shape and random labels in [0, num_classes) for input canaries)."""
    shape = (num_canaries, *example_x.shape)
    if check_kind(kind) == "gradient":
        return torch.zeros(shape, dtype=example_x.dtype), torch.zeros(num_canaries, dtype=example_y.dtype)
    generator = torch.Generator().manual_seed(seed + 0xC0FFEE)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(example_x.dtype)
    y = torch.randint(num_classes, (num_canaries,), generator=generator).to(example_y.dtype)
    return x, y


def per_sample_loss(outputs, y: torch.Tensor, canary_id: torch.Tensor, kind: str,
                    criterion: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Loss [B] of each sample. Gradient canaries: a canary's loss is its canary output alone,
    a real sample's its criterion loss (``torch.where`` sends no gradient to the other one)."""
    if kind == "gradient":
        model_output, canary_output = outputs
        return torch.where(canary_id > 0, canary_output, criterion(model_output, y, reduction="none"))
    return criterion(outputs, y, reduction="none")
