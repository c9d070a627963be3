"""DP optimizers: wrap any torch optimizer; clip (through the model), noise once, scale, step, account.

Opacus's names and paths: ``optimizer`` (DPOptimizer and its helpers), ``perlayeroptimizer``,
``adaclipoptimizer``, ``ddpoptimizer``, ``ddp_perlayeroptimizer``, ``optimizer_fast_gradient_clipping``,
``ddpoptimizer_fast_gradient_clipping``; ``get_optimizer_class`` picks one.
"""

from .adaclipoptimizer import AdaClipDPOptimizer
from .ddp_perlayeroptimizer import SimpleDistributedPerLayerOptimizer
from .ddpoptimizer_fast_gradient_clipping import DistributedDPOptimizerFastGradientClipping
from .distributed_dp_optimizer import DistributedDPOptimizer, FSDPDPOptimizer
from .dp_optimizer import DPOptimizer
from .optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from .perlayeroptimizer import DPPerLayerOptimizer


def get_optimizer_class(clipping: str, distributed: bool, grad_sample_mode: str = None):
    """The DPOptimizer class for a clipping mode, in one process or several (Opacus's helper).
    "automatic" clipping (fastdp's) uses the base classes with ``clipping="automatic"``."""
    if clipping == "per_layer":
        return SimpleDistributedPerLayerOptimizer if distributed else DPPerLayerOptimizer
    if clipping == "adaptive":
        if distributed:
            raise ValueError("clipping='adaptive' is not supported across processes; use 'flat', 'per_layer' or "
                             "'automatic'")
        return AdaClipDPOptimizer
    if clipping in ("flat", "automatic"):
        if grad_sample_mode == "ghost":
            return DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
        return DistributedDPOptimizer if distributed else DPOptimizer
    raise ValueError(f"clipping must be one of 'flat', 'per_layer', 'automatic', 'adaptive', got {clipping!r}")


__all__ = [
    "AdaClipDPOptimizer",
    "DistributedDPOptimizer",
    "DistributedDPOptimizerFastGradientClipping",
    "DPOptimizer",
    "DPOptimizerFastGradientClipping",
    "DPPerLayerOptimizer",
    "FSDPDPOptimizer",
    "SimpleDistributedPerLayerOptimizer",
    "get_optimizer_class",
]
