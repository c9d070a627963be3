"""Opacus's import path ``opacus.data_loader``: the Poisson loader lives in ``fastdp.data``."""

from .data import DPDataLoader  # noqa: F401
from .data.data_loader import CollateWithEmptyBatches  # noqa: F401
