"""Opacus's import path ``opacus.grad_sample.conv`` (see ``fastdp.grad_sample.samplers``)."""

from .samplers import compute_conv_grad_sample  # noqa: F401

#: Opacus's alternative conv grad sampler; fastdp's conv rule is the one implementation
convolution2d_backward_as_a_convolution = compute_conv_grad_sample

__all__ = ["compute_conv_grad_sample", "convolution2d_backward_as_a_convolution"]
