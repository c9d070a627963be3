"""Registering validators and fixers (Opacus's ``opacus.validators.utils``)."""

from __future__ import annotations

from typing import Sequence, Type, Union

from .module_validator import ModuleValidator


def _classes(target) -> Sequence[type]:
    return list(target) if isinstance(target, (list, tuple)) else [target]


def register_module_validator(target_class_or_classes: Union[type, Sequence[type]],
                              validator_class: Type[ModuleValidator] = ModuleValidator):
    """Decorator: ``fn(module) -> [UnsupportedModuleError, ...]`` validates modules of these classes (and
    their subclasses without a validator of their own), instead of fastdp's built-in checks."""

    def decorator(fn):
        for cls in _classes(target_class_or_classes):
            validator_class.VALIDATORS[cls] = fn
        return fn

    return decorator


def register_module_fixer(target_class_or_classes: Union[type, Sequence[type]],
                          validator_class: Type[ModuleValidator] = ModuleValidator):
    """Decorator: ``fn(module, **kwargs) -> module`` replaces modules of these classes in ``ModuleValidator.fix``."""

    def decorator(fn):
        for cls in _classes(target_class_or_classes):
            validator_class.FIXERS[cls] = fn
        return fn

    return decorator
