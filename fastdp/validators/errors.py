"""The errors ``ModuleValidator`` reports (Opacus's ``opacus.validators.errors`` hierarchy).

All are ``ValueError`` s. An error about one submodule carries ``module_path`` (``""`` for the
root) and ``module_type``; ``validate(strict=True)`` raises one ``UnsupportedModuleError``
listing them all in ``errors``.
"""

from __future__ import annotations

from typing import Optional, Sequence


class UnsupportedError(ValueError):
    """Something DP training cannot handle."""


class UnsupportedModuleError(UnsupportedError):
    """A module DP training cannot handle as configured."""

    def __init__(
        self,
        message="",
        *,
        module_path: Optional[str] = None,
        module_type: Optional[str] = None,
        errors: Sequence["UnsupportedModuleError"] = (),
    ):
        if isinstance(message, (list, tuple)):  # Opacus raises UnsupportedModuleError(list_of_errors)
            errors, message = list(message), "\n  ".join(str(e) for e in message)
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type
        self.errors = list(errors) or [self]


class UnsupportableModuleError(UnsupportedModuleError):
    """A module no DP mechanism of this kind can support (it mixes the samples of a batch)."""


class SampleMixingModuleError(UnsupportableModuleError, NotImplementedError):
    """A module that mixes the samples of a batch (BatchNorm) met by GradSampleModule: a ValueError as every
    fastdp refusal, and the NotImplementedError Opacus's GradSampleModule raises there."""


class NotYetSupportedModuleError(UnsupportedModuleError):
    """A module fastdp does not support yet."""


class ShouldReplaceModuleError(UnsupportedModuleError):
    """A module supported through a replacement: ``ModuleValidator.fix`` makes it (BatchNorm → GroupNorm,
    nn.LSTM → DPLSTM, ...)."""


class IllegalModuleConfigurationError(UnsupportedModuleError):
    """A supported module configured in a way DP training cannot make private (running statistics,
    Embedding max_norm, a model in eval mode, ...)."""
