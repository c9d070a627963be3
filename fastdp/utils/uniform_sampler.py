"""Opacus's import path ``opacus.utils.uniform_sampler``: the samplers live in ``fastdp.data``."""

from ..data.distributed_sampler import DistributedUniformWithReplacementSampler  # noqa: F401
from ..data.samplers import UniformWithReplacementSampler  # noqa: F401
