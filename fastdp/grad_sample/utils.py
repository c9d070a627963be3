"""Opacus's ``opacus.grad_sample.utils``: registering samplers, choosing a GradSampleModule class by mode."""

from __future__ import annotations

import warnings
from typing import Sequence, Type, Union

from torch import nn

from ..engine.grad_sample_module import GradSampleModule
from ..engine.rules import register_grad_sampler  # noqa: F401  (Opacus's signature, re-exported)
from .grad_sample_module import GradSampleHooks, HooksGradSampleModule
from .grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from .gsm_exp_weights import GradSampleModuleExpandedWeights
from .gsm_no_op import GradSampleModuleNoOp

_GSM_CLASSES = {
    "hooks": HooksGradSampleModule,
    "functorch": HooksGradSampleModule,
    "ew": GradSampleModuleExpandedWeights,
    "ghost": GradSampleModuleFastGradientClipping,
    "bk": GradSampleModuleFastGradientClipping,
    "no_op": GradSampleModuleNoOp,
}
_HOOKS_CLASSES = {
    "hooks": GradSampleHooks,
    "functorch": GradSampleHooks,
    "ew": GradSampleHooks,
    "ghost": GradSampleHooksFastGradientClipping,
    "bk": GradSampleHooksFastGradientClipping,
}


def _lookup(table, grad_sample_mode: str):
    if grad_sample_mode not in table:
        raise ValueError(
            f"grad_sample_mode must be one of {sorted(table)}, got {grad_sample_mode!r} (Opacus's FSDP/TP ghost "
            "modes have no fastdp counterpart: bk clips in one backward under FSDP too)"
        )
    return table[grad_sample_mode]


def get_gsm_class(grad_sample_mode: str) -> Type[GradSampleModule]:
    """The GradSampleModule class for a mode: "hooks"/"functorch"/"ew" materialise ``p.grad_sample``;
    "ghost"/"bk" is fastdp's one-backward book-keeping; "no_op" computes nothing (you set ``p.grad_sample``)."""
    return _lookup(_GSM_CLASSES, grad_sample_mode)


def get_hooks_class(grad_sample_mode: str):
    """The ``GradSampleHooks`` class for a mode (``wrap_model=False``)."""
    return _lookup(_HOOKS_CLASSES, grad_sample_mode)


def prepare_module(model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args, **kwargs):
    """``model`` wrapped in the GradSampleModule class of ``grad_sample_mode`` (or, with
    ``wrap_model=False``, hooked in place: a ``GradSampleHooks``)."""
    if grad_sample_mode == "functorch":
        kwargs["force_functorch"] = True
    if grad_sample_mode not in ("ghost", "bk"):
        kwargs.pop("max_grad_norm", None)  # only the ghost classes take it
    cls = get_gsm_class(grad_sample_mode) if wrap_model else get_hooks_class(grad_sample_mode)
    return cls(model, *args, **kwargs)


def wrap_model(model: nn.Module, grad_sample_mode: str, wrap_model: bool = True, *args, **kwargs):
    """Opacus's older name of ``prepare_module``."""
    return prepare_module(model, grad_sample_mode, wrap_model, *args, **kwargs)


def register_norm_sampler(target_class_or_classes: Union[type, Sequence[type]]):
    """Opacus's norm-sampler registration. fastdp computes per-sample norms from its layer rules, which
    also give the clipped sums a norm alone cannot; a registered norm sampler would not be used, so this
    warns and registers nothing: register a ``fastdp.LayerRule`` (``norm_sq_per_param``, ``clipped_grad``)
    or a grad sampler (``register_grad_sampler``) instead."""

    def decorator(fn):
        warnings.warn(
            f"register_norm_sampler({target_class_or_classes!r}): fastdp does not use norm samplers; register a "
            "grad sampler (fastdp.register_grad_sampler) or a fastdp.LayerRule for this layer",
            UserWarning,
            stacklevel=2,
        )
        return fn

    return decorator


__all__ = ["register_grad_sampler", "register_norm_sampler", "prepare_module", "wrap_model", "get_gsm_class",
           "get_hooks_class"]
