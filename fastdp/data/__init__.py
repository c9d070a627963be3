"""Poisson-sampled data loading (step 1 of a DP step)."""

from .data_loader import DPDataLoader, suggested_padded_batch_size
from .distributed_sampler import DistributedUniformWithReplacementSampler
from .samplers import UniformWithReplacementSampler

__all__ = [
    "DPDataLoader",
    "DistributedUniformWithReplacementSampler",
    "UniformWithReplacementSampler",
    "suggested_padded_batch_size",
]
