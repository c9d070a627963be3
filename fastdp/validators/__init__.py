"""Model checks and fixes before DP training (BatchNorm → GroupNorm, rule configuration checks).

Opacus's paths: ``fastdp.validators.errors`` (the error classes), ``fastdp.validators.utils``
(``register_module_validator``, ``register_module_fixer``).
"""

from .errors import (
    IllegalModuleConfigurationError,
    NotYetSupportedModuleError,
    ShouldReplaceModuleError,
    UnsupportableModuleError,
    UnsupportedError,
    UnsupportedModuleError,
)
from .module_validator import ModuleValidator
from .utils import register_module_fixer, register_module_validator

__all__ = [
    "ModuleValidator",
    "register_module_validator",
    "register_module_fixer",
    "UnsupportedError",
    "UnsupportedModuleError",
    "UnsupportableModuleError",
    "NotYetSupportedModuleError",
    "ShouldReplaceModuleError",
    "IllegalModuleConfigurationError",
]
