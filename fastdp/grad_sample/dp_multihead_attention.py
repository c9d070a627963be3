"""Opacus's import path ``opacus.grad_sample.dp_multihead_attention`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_sequence_bias_grad_sample  # noqa: F401

__all__ = ["compute_sequence_bias_grad_sample"]
