"""Opacus's "no_op" mode (``opacus.grad_sample.gsm_no_op``): the model is not routed; you compute
``p.grad_sample`` yourself (e.g. with torch.func, as Opacus's cifar10 example does) and the
``DPOptimizer`` clips them, per sample, at ``step()``. Those rows are trusted to be one per sample.
"""

from __future__ import annotations

from torch import nn

from ..engine.grad_sample_module import check_loss_reduction


class GradSampleModuleNoOp(nn.Module):
    """Wraps ``m`` without computing anything: forward is ``m``'s; ``p.grad_sample`` is set by you."""

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean", **kwargs):
        super().__init__()
        self._module = m
        self.batch_first = bool(batch_first)
        self.loss_reduction = check_loss_reduction(loss_reduction)

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_module"), name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self.parameters():
            p.grad_sample = None

    def forbid_grad_accumulation(self) -> None:
        """Nothing to refuse: no backward is captured."""

    def allow_grad_accumulation(self) -> None:
        """Nothing to allow: no backward is captured."""

    def to_standard_module(self) -> nn.Module:
        return self._module


__all__ = ["GradSampleModuleNoOp"]
