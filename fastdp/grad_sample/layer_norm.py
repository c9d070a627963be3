"""Opacus's import path ``opacus.grad_sample.layer_norm`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_layer_norm_grad_sample  # noqa: F401

__all__ = ["compute_layer_norm_grad_sample"]
