"""Opacus's import path ``opacus.grad_sample.dp_rnn`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_rnn_linear_grad_sample  # noqa: F401

__all__ = ["compute_rnn_linear_grad_sample"]
