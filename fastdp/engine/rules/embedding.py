"""Rule for nn.Embedding: per-sample norms and clipped gradients by segment-sum over tokens.

``sparse=True`` embeddings are supported, but the clipped gradient is dense: noise is added
to every row anyway, so a sparse gradient would not stay sparse after the DP step.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple

import torch
from torch import nn

from ...ops import rounding, uses_torch_reference
from ...ops.embedding import (
    add_embedding_clipped_grad, embedding_clipped_grad, embedding_grad_sample, embedding_norm_sq, token_mass,
)
from . import register_rule
from .base import ClipFactors, LayerRule, NormBoundsRule, OuterFactors, factors_for


class TokenList(NamedTuple):
    """The looked-up tokens of a batch, in the layout the embedding ops take."""

    ids: torch.Tensor  # [N] int64
    sample_of_token: torch.Tensor  # [N] int64
    token_grads: torch.Tensor  # [N, dim]
    batch_size: int


def check_lookup_options(module: nn.Module) -> None:
    """Options shared by nn.Embedding and nn.EmbeddingBag that break per-sample clipping."""
    name = type(module).__name__
    if module.max_norm is not None:
        raise ValueError(
            f"{name}(max_norm={module.max_norm}) renormalises weight rows in place during forward, "
            "which DP training cannot account for; drop max_norm (clip the weights yourself after "
            "each optimizer step if needed)"
        )
    if module.scale_grad_by_freq:
        raise ValueError(
            f"{name}(scale_grad_by_freq=True) scales gradients by token counts over the whole batch, "
            "coupling samples and breaking per-sample clipping; set scale_grad_by_freq=False"
        )


class EmbeddingLookupRule(NormBoundsRule):
    """Shared by lookup layers: subclasses say how a call becomes a ``TokenList``."""

    def tokens(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> TokenList:
        raise NotImplementedError

    def check(self, module: nn.Module) -> None:
        check_lookup_options(module)

    @staticmethod
    def _padding_idx(module: nn.Module) -> int:
        return -1 if module.padding_idx is None else module.padding_idx

    def norm_bounds(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor):
        """The norm bound and the slack ``κ_i Σ_t ‖g_t‖`` from one token list: a sample's tokens of one row
        are summed (and may cancel) before any other sample's, in every implementation of
        ``embedding_clipped_grad``."""
        if not self.trainable_params(module):
            return {}, {}
        ids, sample_of_token, token_grads, batch_size = tokens = self.tokens(module, inputs, grad_output)
        padding_idx = self._padding_idx(module)
        mass, counts = token_mass(sample_of_token, token_grads, batch_size, ids, padding_idx)
        kappa = rounding.clipped_sum_error(
            rounding.accumulation_dtype(token_grads), token_grads.device, positions=counts, rows=ids.numel()
        )
        return {"weight": embedding_norm_sq(*tokens, module.num_embeddings, padding_idx)}, {"weight": kappa * mass}



    def clipped_grad(
        self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors
    ) -> Dict[str, torch.Tensor]:
        if not self.trainable_params(module):
            return {}
        ids, sample_of_token, token_grads, _ = self.tokens(module, inputs, grad_output)
        factors = factors_for(clip_factors, "weight")
        grad = embedding_clipped_grad(
            ids, sample_of_token, token_grads, factors, module.num_embeddings, self._padding_idx(module)
        )
        return {"weight": grad.to(module.weight.dtype)}

    def add_clipped_grad(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors,
                         out: Dict[str, torch.Tensor]) -> None:
        """Scattered into ``out`` itself (``add_embedding_clipped_grad``: no [V, dim] temporary) where it has the
        row sums' dtype and the torch reference runs."""
        target = out.get("weight")
        if target is None:
            return
        ids, sample_of_token, token_grads, _ = self.tokens(module, inputs, grad_output)
        factors = factors_for(clip_factors, "weight")
        args = (ids, sample_of_token, token_grads, factors, module.num_embeddings, self._padding_idx(module))
        if target.dtype == rounding.accumulation_dtype(token_grads) and uses_torch_reference("embedding_clipped_grad", *args):
            add_embedding_clipped_grad(target, *args)
        else:
            target.add_(embedding_clipped_grad(*args))

    def grad_sample(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.trainable_params(module):
            return {}
        tokens = self.tokens(module, inputs, grad_output)
        grads = embedding_grad_sample(*tokens, module.num_embeddings, self._padding_idx(module))
        return {"weight": grads.to(module.weight.dtype)}


class EmbeddingRule(EmbeddingLookupRule):
    """nn.Embedding with ids of any shape ``[B, *]``: every id is one token of its sample."""

    module_types = (nn.Embedding,)

    def tokens(self, module: nn.Embedding, inputs: tuple, grad_output: torch.Tensor) -> TokenList:
        ids = inputs[0]
        batch_size = ids.shape[0]
        sample_of_token = torch.arange(batch_size, device=ids.device).repeat_interleave(math.prod(ids.shape[1:]))
        return TokenList(
            ids.reshape(-1).long(), sample_of_token, grad_output.reshape(-1, module.embedding_dim), batch_size
        )

    def outer_factors(self, module: nn.Embedding, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, OuterFactors]:
        """weight [V, D]: sum_t onehot(id_t) ⊗ g_t, the one-hot kept as the ids; padding tokens get g_t = 0
        (torch never updates that row from a lookup; another use of a tied weight may)."""
        if not self.trainable_params(module):
            return {}
        ids = inputs[0]
        ids = ids.reshape(ids.shape[0], -1).long()
        g = grad_output.reshape(ids.shape[0], ids.shape[1], module.embedding_dim)
        if module.padding_idx is not None:
            g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        return {"weight": OuterFactors(ids, g)}


register_rule(EmbeddingRule())
