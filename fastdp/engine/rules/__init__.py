"""Layer rules, one file per layer type, and the registry that maps module classes to them."""

from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from .base import LayerRule

_RULES: Dict[type, LayerRule] = {}


def register_rule(rule: LayerRule, *module_types: type) -> LayerRule:
    """Use ``rule`` for modules of the given classes (default: ``rule.module_types``)."""
    types = module_types or rule.module_types
    if not types:
        raise ValueError("register_rule needs module_types (as arguments or rule.module_types)")
    for module_type in types:
        _RULES[module_type] = rule
    return rule


#: rules for classes of optional libraries, by qualified name ("transformers.pytorch_utils.Conv1D"):
#: registering them needs no import of the library, and they apply once a module of that class shows up
_RULES_BY_NAME: Dict[str, LayerRule] = {}


def register_rule_by_name(rule: LayerRule, *qualified_names: str) -> LayerRule:
    """Use ``rule`` for modules whose class (or a base class) is ``module.QualName``, without importing it."""
    if not qualified_names:
        raise ValueError("register_rule_by_name needs at least one qualified class name, e.g. 'package.module.Class'")
    for name in qualified_names:
        _RULES_BY_NAME[name] = rule
    return rule


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_rule(module: nn.Module) -> Optional[LayerRule]:
    """The rule for this module's class (or its nearest registered base class, by class or by name), else None."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
        if _RULES_BY_NAME and qualified_name(cls) in _RULES_BY_NAME:
            return _RULES_BY_NAME[qualified_name(cls)]
    return None


def register_grad_sampler(target_class_or_classes):
    """Decorator (Opacus's signature): ``fn(layer, activations, backprops) -> {param: grad_sample}``."""
    from .grad_sampler import GradSamplerRule

    classes = target_class_or_classes if isinstance(target_class_or_classes, (list, tuple)) else [target_class_or_classes]

    def decorate(fn):
        register_rule(GradSamplerRule(fn), *classes)
        return fn

    return decorate


__all__ = ["LayerRule", "register_rule", "register_rule_by_name", "register_grad_sampler", "get_rule"]

from . import linear  # noqa: E402,F401  (registers nn.Linear)
from . import conv  # noqa: E402,F401  (registers nn.Conv1d/2d/3d)
from . import embedding, embedding_bag, layer_norm, group_norm, instance_norm, rms_norm  # noqa: E402,F401
from . import rnn, multihead_attention  # noqa: E402,F401  (fastdp.layers registers its DP layers with rnn's rule)
from . import hf_conv1d, hf_rms_norm  # noqa: E402,F401  (Hugging Face classes, by name)
