"""Opacus's ``opacus.grad_sample.gsm_base``: every fastdp GradSampleModule is the engine's class."""

from ..engine.grad_sample_module import GradSampleModule as AbstractGradSampleModule
from .grad_sample_module import GradSampleHooks as AbstractGradSampleHooks

__all__ = ["AbstractGradSampleModule", "AbstractGradSampleHooks"]
