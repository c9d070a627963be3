"""Opacus's import path ``opacus.grad_sample.linear`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_linear_grad_sample  # noqa: F401

__all__ = ["compute_linear_grad_sample"]
