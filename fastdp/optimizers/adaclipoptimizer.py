"""Opacus's ``opacus.optimizers.adaclipoptimizer``: DPOptimizer with adaptive clipping (Andrew et al. 2021).

fastdp's adaptive clipping releases a centred count (sensitivity 1/2) and raises the gradient noise
so that both releases together cost ``noise_multiplier`` (``fastdp.optimizers.dp_optimizer.AdaptiveClipping``).
"""

from __future__ import annotations

from .dp_optimizer import DPOptimizer


class AdaClipDPOptimizer(DPOptimizer):
    """``DPOptimizer(clipping="adaptive")`` with Opacus's constructor (fastdp's defaults where Opacus has
    none); the bound follows the ``target_unclipped_quantile`` of the per-sample norms within
    [min_clipbound, max_clipbound]."""

    def __init__(self, optimizer, *, noise_multiplier: float, unclipped_num_std: float, max_grad_norm: float,
                 target_unclipped_quantile: float = 0.5, clipbound_learning_rate: float = 0.2,
                 max_clipbound: float = 1e3, min_clipbound: float = 1e-3, expected_batch_size, loss_reduction: str = "mean",
                 generator=None, secure_mode: bool = False, **kwargs):
        kwargs.pop("clipping", None)
        super().__init__(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, generator=generator,
            secure_mode=secure_mode, clipping="adaptive", target_unclipped_quantile=target_unclipped_quantile,
            clipbound_learning_rate=clipbound_learning_rate, max_clipbound=max_clipbound,
            min_clipbound=min_clipbound, unclipped_num_std=unclipped_num_std, **kwargs,
        )

    target_unclipped_quantile = property(lambda self: self.clipping_policy.target_unclipped_quantile)
    clipbound_learning_rate = property(lambda self: self.clipping_policy.clipbound_learning_rate)
    max_clipbound = property(lambda self: self.clipping_policy.max_clipbound)
    min_clipbound = property(lambda self: self.clipping_policy.min_clipbound)
    unclipped_num_std = property(lambda self: self.clipping_policy.unclipped_num_std)


__all__ = ["AdaClipDPOptimizer"]
