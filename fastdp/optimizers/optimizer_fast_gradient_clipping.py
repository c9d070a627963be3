"""Opacus's ``opacus.optimizers.optimizer_fast_gradient_clipping`` (ghost clipping).

In Opacus this optimizer takes ``p.grad`` as the already clipped sum of a second backward. fastdp's
engine leaves the clipped sum in ``p.grad`` after its one backward in every mode, which is exactly
what ``DPOptimizer`` expects: it is the same class under Opacus's name.
"""

from .dp_optimizer import DPOptimizer


class DPOptimizerFastGradientClipping(DPOptimizer):
    """``DPOptimizer`` for a ``GradSampleModuleFastGradientClipping`` (fastdp's "bk" mode)."""


__all__ = ["DPOptimizerFastGradientClipping"]
