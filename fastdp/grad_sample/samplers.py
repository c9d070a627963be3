"""Opacus-style per-layer functions ``compute_*_grad_sample(layer, activations, backprops)`` and the
``GradSampleModule.GRAD_SAMPLERS`` registry, both backed by fastdp's layer rules.

Each function returns ``{parameter: per-sample gradients [B, *p.shape]}`` for the layer's trainable
parameters, from its inputs (``activations``, a list) and the gradient of its output (``backprops``),
both batch-first — what the layer's rule computes in "hooks" mode.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Dict, List

import torch
from torch import nn

from ..engine.rules import get_rule, register_rule
from ..engine.rules.functorch import FUNCTORCH_RULE
from ..engine.rules.grad_sampler import GradSamplerRule


def grad_sample_by_rule(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor,
                        rule=None) -> Dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``layer``'s trainable parameters from ``rule`` (default: its registered
    rule; torch.func without one)."""
    rule = rule or get_rule(layer) or FUNCTORCH_RULE
    inputs = tuple(activations) if isinstance(activations, (list, tuple)) else (activations,)
    by_name = rule.grad_sample(layer, inputs, backprops)
    params = dict(layer.named_parameters(recurse=False))
    return {params[name]: grads for name, grads in by_name.items()}


def _builtin_sampler(*classes: type):
    """A ``compute_*_grad_sample`` bound to the rules fastdp registers for ``classes`` (captured now, so a
    grad sampler registered later for those classes may call it without calling itself)."""
    rules = {cls: get_rule_for_class(cls) for cls in classes}

    def compute(layer: nn.Module, activations: List[torch.Tensor], backprops: torch.Tensor):
        rule = next((rules[c] for c in type(layer).__mro__ if c in rules), None)
        return grad_sample_by_rule(layer, activations, backprops, rule)

    return compute


def get_rule_for_class(cls: type):
    from ..engine.rules import _RULES

    return next((_RULES[c] for c in cls.__mro__ if c in _RULES), None)


compute_linear_grad_sample = _builtin_sampler(nn.Linear)
compute_conv_grad_sample = _builtin_sampler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
compute_embedding_grad_sample = _builtin_sampler(nn.Embedding)
compute_embeddingbag_grad_sample = _builtin_sampler(nn.EmbeddingBag)
compute_group_norm_grad_sample = _builtin_sampler(nn.GroupNorm)
compute_instance_norm_grad_sample = _builtin_sampler(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
compute_layer_norm_grad_sample = _builtin_sampler(nn.LayerNorm)
compute_rms_norm_grad_sample = _builtin_sampler(nn.RMSNorm)
compute_rnn_linear_grad_sample = _builtin_sampler(nn.Linear)
compute_sequence_bias_grad_sample = grad_sample_by_rule  # SequenceBias's rule lives in fastdp.layers


def compute_embedding_norm_sample(layer: nn.Embedding, activations: List[torch.Tensor], backprops: torch.Tensor
                                  ) -> Dict[nn.Parameter, torch.Tensor]:
    """Each sample's gradient norm for an Embedding's weight, ``[B]`` in the output gradient's dtype (as
    Opacus), without per-sample gradients (the rule's norm, an upper bound within rounding: segment sums,
    never a dense one-hot)."""
    rule = get_rule(layer)
    inputs = tuple(activations) if isinstance(activations, (list, tuple)) else (activations,)
    norm_sq = rule.norm_sq_per_param(layer, inputs, backprops)
    return {layer.weight: norm_sq["weight"].sqrt().to(backprops.dtype)} if "weight" in norm_sq else {}


class GradSamplers(MutableMapping):
    """``GradSampleModule.GRAD_SAMPLERS`` (Opacus's registry): ``[LayerClass]`` is a function
    ``(layer, activations, backprops) -> {param: grad_sample}`` computed by that class's rule, and
    assigning one registers it as the class's rule (as ``register_grad_sampler`` does)."""

    def __init__(self):
        self._assigned: Dict[type, object] = {}
        self._previous: Dict[type, object] = {}  # the rule an assignment replaced, put back by del

    def __getitem__(self, cls: type):
        if cls in self._assigned:
            return self._assigned[cls]
        if not isinstance(cls, type) or get_rule_for_class(cls) is None:
            raise KeyError(cls)
        return _builtin_sampler(cls)

    def __setitem__(self, cls: type, fn) -> None:
        if getattr(fn, "__qualname__", "").startswith("_builtin_sampler") or fn is grad_sample_by_rule:
            # putting back what __getitem__ gave (or a built-in compute_*): the class's own rule
            rule = self._previous.pop(cls, None)
            if rule is not None:
                register_rule(rule, cls)
            self._assigned.pop(cls, None)
            return
        self._previous.setdefault(cls, get_rule_for_class(cls))
        register_rule(GradSamplerRule(fn), cls)
        self._assigned[cls] = fn

    def __delitem__(self, cls: type) -> None:
        self[cls] = grad_sample_by_rule

    def __iter__(self):
        from ..engine.rules import _RULES

        return iter(_RULES)

    def __len__(self) -> int:
        from ..engine.rules import _RULES

        return len(_RULES)
