"""Opacus's ``opacus.optimizers.ddpoptimizer_fast_gradient_clipping``."""

from .distributed_dp_optimizer import DistributedDPOptimizer


class DistributedDPOptimizerFastGradientClipping(DistributedDPOptimizer):
    """``DistributedDPOptimizer`` for fastdp's "bk" mode (Opacus's ghost clipping across processes)."""


__all__ = ["DistributedDPOptimizerFastGradientClipping"]
