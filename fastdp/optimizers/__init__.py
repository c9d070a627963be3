"""DP optimizers: wrap any torch optimizer; noise once, scale, step, account."""

from .distributed_dp_optimizer import DistributedDPOptimizer, FSDPDPOptimizer
from .dp_optimizer import DPOptimizer

__all__ = ["DPOptimizer", "DistributedDPOptimizer", "FSDPDPOptimizer"]
