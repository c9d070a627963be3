"""Opacus's ghost-clipping loss wrappers (``opacus.utils.fast_gradient_clipping_utils``), on fastdp.

Opacus's ghost clipping needs two backward passes, packaged into ``loss.backward()`` by these
wrappers. fastdp clips inside one backward in every mode, so ``backward()`` here is one backward of
the reduced per-sample loss. What the wrappers still give: the loss is computed per sample
(``reduction="none"`` then reduced per sample), so it cannot couple samples.
"""

from __future__ import annotations

import torch


class DPTensorFastGradientClipping:
    """Per-sample losses ``[B]`` with the training step in ``backward()``; arithmetic with scalars and
    other such losses (same reduction) acts on the per-sample losses."""

    def __init__(self, module, optimizer, loss_per_sample: torch.Tensor, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.module = module
        self.optimizer = optimizer
        self.loss_per_sample = loss_per_sample
        self.loss_reduction = loss_reduction

    def _new(self, loss_per_sample: torch.Tensor) -> "DPTensorFastGradientClipping":
        return DPTensorFastGradientClipping(self.module, self.optimizer, loss_per_sample, self.loss_reduction)

    def _other(self, other):
        if isinstance(other, DPTensorFastGradientClipping):
            if other.loss_reduction != self.loss_reduction:
                raise ValueError(f"cannot combine losses with reductions {self.loss_reduction!r} and "
                                 f"{other.loss_reduction!r}")
            return other.loss_per_sample
        return other

    def reduced(self) -> torch.Tensor:
        """The batch loss: the mean or sum of the per-sample losses."""
        return self.loss_per_sample.mean(dim=0) if self.loss_reduction == "mean" else self.loss_per_sample.sum(dim=0)

    def detach(self) -> torch.Tensor:
        return self.reduced().detach()

    def item(self) -> float:
        return self.detach().item()

    def backward(self) -> None:
        """One backward of the reduced loss: fastdp's engine clips each sample inside it."""
        self.reduced().backward()

    def __add__(self, other):
        return self._new(self.loss_per_sample + self._other(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self._new(self.loss_per_sample - self._other(other))

    def __rsub__(self, other):
        return self._new(self._other(other) - self.loss_per_sample)

    def __mul__(self, other):
        return self._new(self.loss_per_sample * other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._new(self.loss_per_sample / other)

    def __neg__(self):
        return self._new(-self.loss_per_sample)

    def __repr__(self):
        return f"DPTensorFastGradientClipping(loss_reduction={self.loss_reduction}, shape={tuple(self.loss_per_sample.shape)})"


class DPLossFastGradientClipping:
    """Wraps a criterion: called as the criterion, returns a ``DPTensorFastGradientClipping`` of
    per-sample losses. ``shape=(B, T, ...)`` (the logits' shape before flattening) groups a flattened
    token loss ``[B·T]`` per sequence: each sequence is one sample (its mean over non-ignored tokens
    for a mean loss)."""

    def __init__(self, module, optimizer, criterion, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        reduction = getattr(criterion, "reduction", loss_reduction)
        others = {"criterion": reduction, "module": getattr(module, "loss_reduction", loss_reduction),
                  "optimizer": getattr(optimizer, "loss_reduction", loss_reduction)}
        mismatched = {k: v for k, v in others.items() if v != loss_reduction}
        if mismatched:
            raise ValueError(f"loss_reduction={loss_reduction!r} but {mismatched}; make them agree")
        self.module, self.optimizer, self.criterion, self.loss_reduction = module, optimizer, criterion, loss_reduction

    def __call__(self, *args, shape=None, **kwargs) -> DPTensorFastGradientClipping:
        previous = getattr(self.criterion, "reduction", None)
        self.criterion.reduction = "none"
        try:
            loss = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = previous
        if shape is not None and loss.dim() == 1 and loss.shape[0] == shape[0] * shape[1]:
            loss = loss.view(shape[0], shape[1])
            ignore_index = getattr(self.criterion, "ignore_index", None)
            target = kwargs.get("target", args[1] if len(args) > 1 else None)
            if self.loss_reduction == "mean" and ignore_index is not None and target is not None:
                valid = (target.view(shape[0], shape[1]) != ignore_index)
                loss = loss.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        if loss.dim() > 1:  # one loss per sample: reduce the rest as the criterion would
            loss = loss.flatten(1)
            loss = loss.mean(dim=1) if self.loss_reduction == "mean" else loss.sum(dim=1)
        return DPTensorFastGradientClipping(self.module, self.optimizer, loss, self.loss_reduction)


__all__ = ["DPTensorFastGradientClipping", "DPLossFastGradientClipping"]
