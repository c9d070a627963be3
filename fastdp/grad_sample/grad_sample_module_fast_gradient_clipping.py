"""Opacus's ``opacus.grad_sample.grad_sample_module_fast_gradient_clipping`` (ghost clipping).

Opacus's ghost clipping takes two backward passes (norms, then the reweighted loss). fastdp's
default "bk" mode clips with ghost (or direct) norms inside one backward, so this class is the
engine in "bk" mode with Opacus's constructor; ``max_grad_norm`` and ``use_ghost_clipping`` are
kept for ``get_clipping_coef`` (the optimizer's bound is what clips).
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.clipping import STABILITY_EPS, check_max_grad_norm
from ..engine.grad_sample_module import GradSampleModule
from .grad_sample_module import GradSampleHooks


class GradSampleModuleFastGradientClipping(GradSampleModule):
    """GradSampleModule in "bk" mode (Opacus's "ghost"), with Opacus's constructor."""

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = False, force_functorch: bool = False, max_grad_norm: float = 1.0,
                 use_ghost_clipping: bool = True, **kwargs):
        kwargs.setdefault("mode", "functorch" if force_functorch else "bk")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
                         force_functorch=force_functorch, **kwargs)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.use_ghost_clipping = bool(use_ghost_clipping)

    def get_norm_sample(self) -> torch.Tensor:
        """Each sample's gradient norm over all parameters in the last backward."""
        if self.per_sample_norms is None:
            raise ValueError("no backward yet: call loss.backward() first")
        return self.per_sample_norms

    def get_clipping_coef(self) -> torch.Tensor:
        """min(1, C / (norm + 1e-6)) per sample, with this module's ``max_grad_norm``."""
        return (self.max_grad_norm / (self.get_norm_sample() + STABILITY_EPS)).clamp(max=1.0)


class GradSampleHooksFastGradientClipping(GradSampleHooks):
    """``GradSampleHooks`` in "bk" mode (Opacus's ghost clipping without wrapping the model)."""

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = False, force_functorch: bool = False, max_grad_norm: float = 1.0,
                 use_ghost_clipping: bool = True, _module=None):
        module = _module if _module is not None else GradSampleModuleFastGradientClipping(
            m, batch_first=batch_first, loss_reduction=loss_reduction, strict=strict,
            force_functorch=force_functorch, max_grad_norm=max_grad_norm, use_ghost_clipping=use_ghost_clipping,
        )
        super().__init__(m, _module=module)


__all__ = ["GradSampleModuleFastGradientClipping", "GradSampleHooksFastGradientClipping"]
