"""What a layer rule is: per-sample gradient information from (layer input, output gradient).

The engine records, for every ruled module call, the module's positional inputs and
the gradient of the loss with respect to its output, both batch-first. A rule turns
them into what one DP step needs without ever forming the non-private gradient:

- ``norm_sq_per_param``: an upper bound of each sample's squared gradient norm, per
  trainable parameter, ``{name: [B]}`` in float64 (``norm_sq`` is their sum): the ops of
  ``fastdp.ops`` return the computed value plus a rigorous bound on its rounding
  (``fastdp.ops.rounding``), so that a sample whose terms cancel cannot come out unclipped;
- ``clipped_grad``: ``sum_i c_i * grad_i`` for each trainable parameter, with one
  factor vector ``c`` for all of them or one per parameter name (per-layer clipping);
  ``add_clipped_grad`` adds the same sums into given tensors in place (the engine's: views of
  the optimizer's gradient buffer), which rules override to skip a gradient-sized temporary;
- ``grad_sample``: the materialised per-sample gradients ``[B, *p.shape]`` (hooks
  mode, tests, and the generic fallback for the two methods above);
- ``outer_factors`` (optional): each parameter's per-sample gradient as a sum of outer
  products, which lets the engine add the cross terms of a parameter shared by several
  calls (tied embedding / lm_head) instead of materialising its per-sample gradients.

``grad_output`` is the gradient of the *summed* per-sample losses (the engine undoes
a mean reduction before calling the rule). Frozen parameters (``requires_grad=False``)
never appear in any result.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from ...ops.embedding import embedding_cross_inner, embedding_linear_cross_inner
from ...ops.linear import linear_cross_inner
from ...ops.rounding import ieee_fp32, norm_sq_upper


ClipFactors = Union[torch.Tensor, Dict[str, torch.Tensor]]


def factors_for(clip_factors: ClipFactors, name: str) -> torch.Tensor:
    """The clip factors of parameter ``name``: shared by all parameters, or its own."""
    return clip_factors[name] if isinstance(clip_factors, dict) else clip_factors


class OuterFactors(NamedTuple):
    """A per-sample gradient ``G_i = sum_t left_it ⊗ right_it`` in the parameter's own layout.

    ``left``: ``[B, T, P]`` (P = the parameter's first dimension), or an integer tensor ``[B, T]``
    of row indices standing for one-hot rows of length P (an embedding lookup: never formed).
    ``right``: ``[B, T, Q]`` with Q the product of the parameter's remaining dimensions (1 for a
    bias). T may differ between two uses of one parameter.
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def is_lookup(self) -> bool:
        return not self.left.is_floating_point()


def outer_inner_product(first: OuterFactors, second: OuterFactors) -> torch.Tensor:
    """An upper bound of the per-sample ``<G_i, G'_i>`` of two uses of one parameter, float64 ``[B]``."""
    if first.is_lookup and second.is_lookup:
        return embedding_cross_inner(first.left, first.right, second.left, second.right)
    if first.is_lookup:
        return embedding_linear_cross_inner(first.left, first.right, second.left, second.right)
    if second.is_lookup:
        return embedding_linear_cross_inner(second.left, second.right, first.left, first.right)
    return linear_cross_inner(first.left, first.right, second.left, second.right)


class LayerRule:
    """Base class. A minimal rule implements only ``grad_sample``."""

    #: module classes this rule handles (used by ``register_rule``)
    module_types: Tuple[type, ...] = ()

    #: True: the module's forward marks its own capture points (``capture.capture_internal``), so
    #: the engine does not capture the module's output; each capture point is one call of the rule
    captures_internally: bool = False

    #: True: the layer's inputs and output have one row per sample whatever the model's ``batch_first``
    #: (torch's own layout for it: an EmbeddingBag's bags are the rows of its output), so the engine never
    #: reads their second dimension as the batch
    batch_first_layout: bool = False

    def trainable_params(self, module: nn.Module) -> Dict[str, nn.Parameter]:
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def prefers_grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> bool:
        """True when materialising this call's per-sample gradients once (then deriving the norm and
        the clipped sum from them) is cheaper than ``norm_sq`` + ``clipped_grad``: tiny per-sample
        gradients (norm layers), or shapes where they are no larger than the activations."""
        return False

    def check(self, module: nn.Module) -> None:
        """Raise a one-line ValueError if this module's configuration cannot be made private."""

    def batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[int]:
        """The number of samples of a call ``module(*args, **kwargs)`` when ``module`` is the whole wrapped
        model, for inputs whose first tensor is not one row per sample; None: that tensor's batch dimension."""
        return None

    def zero_samples(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, rows: torch.Tensor):
        """``(inputs, grad_output)`` with the samples ``rows`` (bool [B]) zeroed, for a sample the engine drops
        (a non-finite norm: its clip factor 0 alone is not enough, as 0 · inf is NaN): here every
        floating-point tensor with B rows. Rules whose inputs have rows that are not samples override it."""
        return tuple(zero_rows(x, rows) for x in inputs), zero_rows(grad_output, rows)

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def norm_sq_per_param(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Upper bounds (``fastdp.ops.rounding``) of each sample's squared norm per parameter; here those of the
        materialised per-sample gradients, which are what the default ``clipped_grad`` sums."""
        grads = self.grad_sample(module, inputs, grad_output)
        return {n: norm_sq_upper(g) for n, g in grads.items()}

    def norm_sq(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(grad_output.shape[0], dtype=torch.float64, device=grad_output.device)
        for norm_sq in self.norm_sq_per_param(module, inputs, grad_output).values():
            total += norm_sq
        return total

    def outer_factors(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, OuterFactors]:
        """``{name: OuterFactors}`` for the trainable parameters whose per-sample gradient is a sum of outer
        products (linear-type layers, lookups); others are left out. Only asked for parameters shared by
        several calls: with every use providing them, the engine adds the cross terms of the uses to their
        norms and never materialises that parameter's per-sample gradients."""
        return {}

    def rounding_slack(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{name: [B] float64}``: for each parameter whose ``clipped_grad`` does not sum materialised
        per-sample gradients, a bound ``s_i`` on how far sample i's contribution as computed can lie from
        ``c_i G_i``, divided by ``c_i`` (``fastdp.ops.rounding``: products and partial sums holding a
        sample's cancelling terms). The engine clips with ``‖G_i‖ + s_i``. Parameters left out round
        nothing beyond one product by c: the default ``clipped_grad`` below sums the very tensors whose
        norms ``norm_sq_per_param`` bounds."""
        return {}

    def norm_bounds(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor):
        """``(norm_sq_per_param, rounding_slack)`` of one call, what the engine clips with. The norms are
        computed with IEEE fp32 products (no TF32), the slack for the settings the clipped sum runs under.
        Rules whose two share work (the samples' term mass) override this."""
        with ieee_fp32():
            norms = self.norm_sq_per_param(module, inputs, grad_output)
        return norms, self.rounding_slack(module, inputs, grad_output)

    def clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        grads = self.grad_sample(module, inputs, grad_output)
        return {n: clipped_sum_of_grad_samples(factors_for(clip_factors, n), g) for n, g in grads.items()}

    def add_clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors,
        out: Dict[str, torch.Tensor],
    ) -> None:
        """``out[name] += clipped_grad(...)[name]`` in place, for every trainable parameter (``out`` has one
        tensor per trainable parameter, in its shape). The sums are ``clipped_grad``'s, whose rounding the
        rule's ``rounding_slack`` bounds; an override that writes into ``out`` directly must sum the same
        products, with each sample's terms reduced as ``fastdp.ops.rounding`` assumes."""
        for name, grad in self.clipped_grad(module, inputs, grad_output, clip_factors).items():
            out[name].add_(grad)


class NormBoundsRule(LayerRule):
    """A rule whose norm bounds and clipped-sum slack come out of one computation (``norm_bounds``: both need
    the samples' term mass, ``fastdp.ops.rounding``); the two single methods are its halves."""

    def norm_bounds(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor):
        raise NotImplementedError

    def norm_sq_per_param(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.norm_bounds(module, inputs, grad_output)[0]

    def rounding_slack(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.norm_bounds(module, inputs, grad_output)[1]


def zero_rows(x, rows: torch.Tensor):
    """``x`` with the rows ``rows`` (bool [B]) zeroed when it is a floating-point tensor of B rows; else ``x``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[0] != rows.shape[0]:
        return x
    return torch.where(rows.view(-1, *([1] * (x.dim() - 1))), torch.zeros((), dtype=x.dtype, device=x.device), x)


def clipped_sum_of_grad_samples(factors: torch.Tensor, grad_samples: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i G_i`` of materialised per-sample gradients, in (at least) fp32 and returned so: in
    bf16/fp16, rounding c and each c·G_i could take a contribution above C."""
    dtype = torch.promote_types(grad_samples.dtype, torch.float32)
    return torch.einsum("b,b...->...", factors.to(dtype), grad_samples.to(dtype))


def add_clipped_sum_of_grad_samples(out: torch.Tensor, factors: torch.Tensor, grad_samples: torch.Tensor) -> None:
    """``out += sum_i c_i G_i`` in place: one matrix-vector product into ``out`` when it and the per-sample
    gradients are both in their fp32 (or fp64) accumulation dtype, else ``clipped_sum_of_grad_samples``
    (the same products c_i·G_i, summed over samples in another order) added to ``out``."""
    dtype = torch.promote_types(grad_samples.dtype, torch.float32)
    if out.dtype == dtype == grad_samples.dtype and out.is_contiguous() and grad_samples.is_contiguous():
        flat = grad_samples.view(grad_samples.shape[0], out.numel())
        out.view(-1).addmv_(flat.T, factors.to(dtype))
    else:
        out.add_(clipped_sum_of_grad_samples(factors, grad_samples))
