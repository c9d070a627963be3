"""Poisson-sampled data loading (step 1 of a DP step)."""

from .data_loader import DPDataLoader, suggested_padded_batch_size
from .samplers import UniformWithReplacementSampler

__all__ = ["DPDataLoader", "UniformWithReplacementSampler", "suggested_padded_batch_size"]
