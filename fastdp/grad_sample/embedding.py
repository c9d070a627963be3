"""Opacus's import path ``opacus.grad_sample.embedding`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_embedding_grad_sample, compute_embeddingbag_grad_sample  # noqa: F401

__all__ = ["compute_embedding_grad_sample", "compute_embeddingbag_grad_sample"]
