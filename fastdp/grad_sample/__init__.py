"""Opacus's import path ``opacus.grad_sample``: the engine lives in ``fastdp.engine``."""

from ..engine.grad_sample_module import GradSampleModule  # noqa: F401
from ..engine.rules import register_grad_sampler  # noqa: F401
