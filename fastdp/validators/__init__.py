"""Model checks and fixes before DP training (BatchNorm → GroupNorm, rule configuration checks)."""

from .module_validator import ModuleValidator, UnsupportableModuleError, UnsupportedModuleError

__all__ = ["ModuleValidator", "UnsupportedModuleError", "UnsupportableModuleError"]
