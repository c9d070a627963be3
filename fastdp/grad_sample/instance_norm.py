"""Opacus's import path ``opacus.grad_sample.instance_norm`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_instance_norm_grad_sample  # noqa: F401

__all__ = ["compute_instance_norm_grad_sample"]
