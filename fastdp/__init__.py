"""fastdp: differentially private training for PyTorch at the speed of non-private training.

Opacus-compatible: ``from fastdp import PrivacyEngine`` where you had ``from opacus import PrivacyEngine``.
"""

__version__ = "0.1.0"

from . import accountants  # noqa: E402,F401
from .data import DPDataLoader  # noqa: E402
from .engine.grad_sample_module import GradSampleModule  # noqa: E402
from . import grad_sample, utils  # noqa: E402,F401  (Opacus paths; grad_sample sets GradSampleModule.GRAD_SAMPLERS)
from .grad_sample import GradSampleModuleFastGradientClipping  # noqa: E402
from .graphed_step import make_graphed_dp_step  # noqa: E402
from .engine.rules import LayerRule, register_grad_sampler, register_rule, register_rule_by_name  # noqa: E402
from .optimizers import DPOptimizer  # noqa: E402
from .layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN  # noqa: E402
from .privacy_engine import PrivacyEngine  # noqa: E402
from .utils.batch_memory_manager import BatchMemoryManager  # noqa: E402
from .validators import ModuleValidator  # noqa: E402

__all__ = [
    "PrivacyEngine",
    "GradSampleModule",
    "GradSampleModuleFastGradientClipping",
    "DPOptimizer",
    "DPDataLoader",
    "BatchMemoryManager",
    "make_graphed_dp_step",
    "ModuleValidator",
    "LayerRule",
    "register_rule",
    "register_rule_by_name",
    "register_grad_sampler",
    "DPLSTM",
    "DPGRU",
    "DPRNN",
    "DPMultiheadAttention",
    "accountants",
]
