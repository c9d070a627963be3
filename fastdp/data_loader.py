"""Opacus's import path ``opacus.data_loader``: the Poisson loader lives in ``fastdp.data``."""

from .data import DPDataLoader  # noqa: F401
from .data.collate import CollateFnWithEmpty, wrap_collate_with_empty  # noqa: F401
from .data.data_loader import CollateWithEmptyBatches, switch_generator  # noqa: F401
