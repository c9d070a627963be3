"""Opacus's ``opacus.optimizers.ddp_perlayeroptimizer``: per-layer clipping across processes."""

from __future__ import annotations

from .distributed_dp_optimizer import DistributedDPOptimizer


class SimpleDistributedPerLayerOptimizer(DistributedDPOptimizer):
    """``DistributedDPOptimizer(clipping="per_layer")``."""

    def __init__(self, optimizer, **kwargs):
        kwargs.pop("clipping", None)
        super().__init__(optimizer, clipping="per_layer", **kwargs)


DistributedPerLayerOptimizer = SimpleDistributedPerLayerOptimizer

__all__ = ["SimpleDistributedPerLayerOptimizer", "DistributedPerLayerOptimizer"]
