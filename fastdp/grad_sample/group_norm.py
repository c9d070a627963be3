"""Opacus's import path ``opacus.grad_sample.group_norm`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_group_norm_grad_sample  # noqa: F401

__all__ = ["compute_group_norm_grad_sample"]
