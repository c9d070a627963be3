"""Schedules for the noise multiplier and the clipping bound of a DPOptimizer (Opacus's ``opacus.schedulers``).

Save and restore them with ``PrivacyEngine.save_checkpoint(..., noise_scheduler=, grad_clip_scheduler=)``.
"""

from .grad_clip_scheduler import ExponentialGradClip, LambdaGradClip, StepGradClip, _GradClipScheduler
from .noise_scheduler import ExponentialNoise, LambdaNoise, StepNoise, _NoiseScheduler

__all__ = [
    "_GradClipScheduler", "ExponentialGradClip", "LambdaGradClip", "StepGradClip",
    "_NoiseScheduler", "ExponentialNoise", "LambdaNoise", "StepNoise",
]
