"""DP optimizers: wrap any torch optimizer; noise once, scale, step, account."""

from .dp_optimizer import DPOptimizer

__all__ = ["DPOptimizer"]
