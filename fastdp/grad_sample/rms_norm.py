"""Opacus's import path ``opacus.grad_sample.rms_norm`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_rms_norm_grad_sample  # noqa: F401

__all__ = ["compute_rms_norm_grad_sample"]
