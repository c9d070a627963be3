"""Opacus's ``opacus.grad_sample.gsm_exp_weights``.

Opacus's "ew" mode computes per-sample gradients with torch's ExpandedWeights. fastdp has no
such mode of its own: "ew" runs the engine in "hooks" mode, whose ``p.grad_sample`` are the same
per-sample gradients.
"""

from .grad_sample_module import HooksGradSampleModule


class GradSampleModuleExpandedWeights(HooksGradSampleModule):
    """Opacus's "ew" GradSampleModule: fastdp's "hooks" mode (same per-sample gradients)."""


__all__ = ["GradSampleModuleExpandedWeights"]
