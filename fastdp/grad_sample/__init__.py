"""Opacus's import path ``opacus.grad_sample``: the engine lives in ``fastdp.engine``.

``GradSampleModule`` is the engine (default mode "bk"); ``get_gsm_class`` / ``prepare_module`` pick the
class for Opacus's mode names ("hooks"/"functorch"/"ew" materialise ``p.grad_sample``, "ghost" is
"bk"); ``GradSampleHooks`` attaches the engine without wrapping the model. The
``compute_*_grad_sample`` functions and ``GradSampleModule.GRAD_SAMPLERS`` are backed by the layer rules.
"""

from ..engine.grad_sample_module import GradSampleModule
from ..engine.rules import register_grad_sampler
from .grad_sample_module import GradSampleHooks, HooksGradSampleModule
from .grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from .gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule
from .gsm_exp_weights import GradSampleModuleExpandedWeights
from .gsm_no_op import GradSampleModuleNoOp
from .samplers import (
    GradSamplers,
    compute_conv_grad_sample,
    compute_embedding_grad_sample,
    compute_embedding_norm_sample,
    compute_group_norm_grad_sample,
    compute_instance_norm_grad_sample,
    compute_layer_norm_grad_sample,
    compute_linear_grad_sample,
    compute_rms_norm_grad_sample,
    compute_rnn_linear_grad_sample,
    compute_sequence_bias_grad_sample,
)
from .utils import get_gsm_class, get_hooks_class, prepare_module, register_norm_sampler, wrap_model

__all__ = [
    "AbstractGradSampleHooks",
    "AbstractGradSampleModule",
    "GradSampleHooks",
    "GradSampleModule",
    "HooksGradSampleModule",
    "GradSampleHooksFastGradientClipping",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleExpandedWeights",
    "GradSampleModuleNoOp",
    "register_grad_sampler",
    "register_norm_sampler",
    "prepare_module",
    "wrap_model",
    "get_gsm_class",
    "get_hooks_class",
    "compute_conv_grad_sample",
    "compute_embedding_grad_sample",
    "compute_embedding_norm_sample",
    "compute_group_norm_grad_sample",
    "compute_instance_norm_grad_sample",
    "compute_layer_norm_grad_sample",
    "compute_linear_grad_sample",
    "compute_rms_norm_grad_sample",
    "compute_rnn_linear_grad_sample",
    "compute_sequence_bias_grad_sample",
]
