"""fastdp: differentially private training for PyTorch at the speed of non-private training.

Opacus-compatible: ``from fastdp import PrivacyEngine`` where you had ``from opacus import PrivacyEngine``.

Imports are lazy: ``import fastdp`` loads nothing but this file, and each public name (or
subpackage, e.g. ``fastdp.losses``) is imported on first access, so the command line and
``fastdp.accountants`` never pay for torch, and training code pays only for what it uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "PrivacyEngine": "fastdp.privacy_engine",
    "GradSampleModule": "fastdp.engine.grad_sample_module",
    "GradSampleModuleFastGradientClipping": "fastdp.grad_sample",
    "DPOptimizer": "fastdp.optimizers",
    "DPDataLoader": "fastdp.data",
    "BatchMemoryManager": "fastdp.utils.batch_memory_manager",
    "make_graphed_dp_step": "fastdp.graphed_step",
    "check_sample_independence": "fastdp.sample_independence",
    "ModuleValidator": "fastdp.validators",
    "LayerRule": "fastdp.engine.rules",
    "register_rule": "fastdp.engine.rules",
    "register_rule_by_name": "fastdp.engine.rules",
    "register_grad_sampler": "fastdp.engine.rules",
    "DPLSTM": "fastdp.layers",
    "DPGRU": "fastdp.layers",
    "DPRNN": "fastdp.layers",
    "DPMultiheadAttention": "fastdp.layers",
}

__all__ = [*_EXPORTS, "accountants"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from . import accountants
    from .data import DPDataLoader
    from .engine.grad_sample_module import GradSampleModule
    from .grad_sample import GradSampleModuleFastGradientClipping
    from .engine.rules import LayerRule, register_grad_sampler, register_rule, register_rule_by_name
    from .graphed_step import make_graphed_dp_step
    from .layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN
    from .optimizers import DPOptimizer
    from .privacy_engine import PrivacyEngine
    from .sample_independence import check_sample_independence
    from .utils.batch_memory_manager import BatchMemoryManager
    from .validators import ModuleValidator


def __getattr__(name: str):
    """Import a public name or a subpackage on first access (PEP 562), then cache it here."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    submodules = [info.name for info in pkgutil.iter_modules(__path__)]
    return sorted(set(globals()) | set(__all__) | set(submodules))
