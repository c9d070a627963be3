"""Opacus's import path ``opacus.grad_sample.embedding_norm_sample`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_embedding_norm_sample  # noqa: F401

__all__ = ["compute_embedding_norm_sample"]
