"""Fallback for any module with trainable parameters and no rule: per-sample grads by torch.func.

Exact but materialising (``[B, *p.shape]`` per parameter) and one vmapped forward
recompute per call; register a rule for a layer type that matters for speed.

``vmap`` needs every tensor input of a call to hold one row per sample along dim 0. A call
that does not (nn.EmbeddingBag's flat form: the tokens of all bags in one 1-D tensor, split
by ``offsets``) cannot be split into samples this way, so it goes to the module's own rule,
which is exact for it (the same rule "bk" and "hooks" modes use); with no rule, a clear
ValueError. This is why grad_sample_mode="functorch" works on such calls too.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import get_rule
from .base import LayerRule


class FunctorchRule(LayerRule):
    """Per-sample gradients of ``<module(x_i), g_i>`` by vmap over samples of ``grad``.

    The engine hands rules batch-first inputs; ``batch_dim=1`` is for models trained with
    ``batch_first=False``, whose layers expect the batch second: each sample is then given to the
    module with its unit batch dimension second (its tensors of 2+ dims, which the engine moved)."""

    def __init__(self, batch_dim: int = 0):
        self.batch_dim = batch_dim

    def _unit_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(self.batch_dim if x.dim() >= self.batch_dim else 0)

    def _sample_of(self, output: torch.Tensor) -> torch.Tensor:
        return output.select(self.batch_dim if output.dim() > self.batch_dim else 0, 0)

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        params = self.trainable_params(module)
        names = list(params)
        if grad_output.shape[0] == 0:
            return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        unsplittable = _why_not_per_sample(module, inputs, grad_output.shape[0])
        if unsplittable is not None:
            return self._own_rule(module, unsplittable).grad_sample(module, inputs, grad_output)

        def sample_loss(values, sample_inputs, sample_grad):
            batched = tuple(self._unit_batch(x) if isinstance(x, torch.Tensor) else x for x in sample_inputs)
            output = functional_call(module, dict(zip(names, values)), batched)
            return (self._sample_of(output) * sample_grad).sum()

        input_dims = tuple(0 if isinstance(x, torch.Tensor) else None for x in inputs)
        with torch.enable_grad():
            grads = vmap(grad(sample_loss), in_dims=(None, input_dims, 0))(
                tuple(p.detach() for p in params.values()), inputs, grad_output
            )
        return dict(zip(names, grads))

    def _own_rule(self, module: nn.Module, reason: str) -> LayerRule:
        """The module's registered rule, for a call torch.func cannot split into samples."""
        rule = get_rule(module)
        if rule is None or rule is self or rule.captures_internally:
            raise ValueError(
                f"torch.func cannot split this {type(module).__name__} call into samples ({reason}); pass "
                "inputs with one row per sample along the batch dimension, or register a rule for "
                f"{type(module).__name__} (fastdp.register_grad_sampler)"
            )
        rule.check(module)  # construction checked FunctorchRule's (no) limits, not the rule's
        return rule


def _why_not_per_sample(module: nn.Module, inputs: tuple, batch_size: int) -> Optional[str]:
    """None when vmap can give each sample its own rows of every tensor input, else why not."""
    if isinstance(module, nn.EmbeddingBag) and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 1:
        # even when the token count equals the batch size, row i is a token, not a bag
        return "1-D input with offsets: the bags' tokens are not rows of a batch"
    for position, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != batch_size):
            return f"input {position} has shape {tuple(x.shape)}, not {batch_size} rows (one per sample)"
    return None


FUNCTORCH_RULE = FunctorchRule()
FUNCTORCH_RULE_BATCH_SECOND = FunctorchRule(batch_dim=1)  # GradSampleModule(batch_first=False)
