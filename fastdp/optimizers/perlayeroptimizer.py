"""Opacus's ``opacus.optimizers.perlayeroptimizer``: DPOptimizer with per-layer clipping."""

from __future__ import annotations

from typing import List

from .dp_optimizer import DPOptimizer


class DPPerLayerOptimizer(DPOptimizer):
    """``DPOptimizer(clipping="per_layer")``: ``max_grad_norm`` is one bound per trainable parameter (in
    optimizer order); one sample moves the sum by at most ‖bounds‖₂, which sets the noise."""

    def __init__(self, optimizer, *, noise_multiplier: float, max_grad_norm: List[float], expected_batch_size,
                 loss_reduction: str = "mean", generator=None, secure_mode: bool = False, **kwargs):
        kwargs.pop("clipping", None)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                         generator=generator, secure_mode=secure_mode, clipping="per_layer", **kwargs)

    @property
    def max_grad_norms(self) -> List[float]:
        """The per-parameter bounds, in optimizer order."""
        return [self.clipping_policy.bounds[id(p)] for p in self.params]


__all__ = ["DPPerLayerOptimizer"]
