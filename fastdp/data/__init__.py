"""Poisson-sampled data loading (step 1 of a DP step)."""

from .data_loader import DPDataLoader
from .samplers import UniformWithReplacementSampler

__all__ = ["DPDataLoader", "UniformWithReplacementSampler"]
