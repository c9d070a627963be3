"""Rule for nn.EmbeddingBag (modes "sum" and "mean"): one bag is one sample.

Each token of a bag receives the bag's output gradient times its weight in the bag
(``per_sample_weights`` in sum mode, 1 / number of non-padding tokens in mean mode), so a
sample's gradient is rank one: norms and clipped sums come from per-token scalars
(``fastdp.ops.embedding_bag``); the token list of the embedding ops serves only the materialised
per-sample gradients. Gradients are dense, as for nn.Embedding.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ...ops import rounding
from ...ops.embedding_bag import BagCoefficients, add_bag_clipped_grad, bag_clipped_sum_error, bag_coefficients, bag_norm_sq
from . import register_rule
from .base import ClipFactors, factors_for, zero_rows
from .embedding import EmbeddingLookupRule, TokenList


class EmbeddingBagRule(EmbeddingLookupRule):
    """Inputs ``(input, offsets=None, per_sample_weights=None)`` as nn.EmbeddingBag.forward takes them:
    ``input`` [B, L] (fixed-size bags), or 1-D with ``offsets`` (B or, with include_last_offset, B + 1)."""

    module_types = (nn.EmbeddingBag,)
    batch_first_layout = True  # bags are rows (ids [B, L] or flat with offsets, output [B, dim]) in any model

    def check(self, module: nn.EmbeddingBag) -> None:
        super().check(module)
        if module.mode == "max":
            raise ValueError(
                "EmbeddingBag(mode='max') sends each gradient to the arg-max row, which is not "
                "recoverable from the recorded inputs; use mode='sum' or mode='mean'"
            )

    def batch_size(self, module: nn.EmbeddingBag, args: tuple, kwargs: dict) -> Optional[int]:
        """Flat 1-D ids with ``offsets``: one sample per bag (``len(offsets)``, less the closing offset with
        ``include_last_offset``), not per token."""
        ids = args[0] if args else kwargs.get("input")
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or not isinstance(offsets, torch.Tensor):
            return None
        return offsets.numel() - (1 if module.include_last_offset else 0)

    def token_weights(self, module: nn.EmbeddingBag, inputs: tuple, batch_size: int):
        """``(ids, bag_of_token, token_weights)`` [N] each (int64, int64, float64): each token's weight in its bag,
        0 for a token the forward leaves out (padding, or past the last offset)."""
        ids, offsets, per_sample_weights = (tuple(inputs) + (None, None))[:3]
        device = ids.device
        counted = torch.ones(ids.numel(), dtype=torch.float64, device=device)
        if ids.dim() == 2:
            bag_of_token = torch.arange(batch_size, device=device).repeat_interleave(ids.shape[1])
        else:
            positions = torch.arange(ids.numel(), dtype=offsets.dtype, device=device)
            bag_of_token = torch.searchsorted(offsets[:batch_size], positions, right=True).long() - 1
            if module.include_last_offset:  # the forward ignores tokens past the last offset
                counted = counted * (positions < offsets[batch_size])
            del positions
        ids = ids.reshape(-1).long()
        if module.padding_idx is not None:  # excluded from the bag, also from the mean's count
            counted = counted * (ids != module.padding_idx)
        if module.mode == "mean":
            bag_sizes = torch.zeros(batch_size, dtype=torch.float64, device=device).index_add_(0, bag_of_token, counted)
            return ids, bag_of_token, counted / bag_sizes.clamp(min=1)[bag_of_token]
        if per_sample_weights is not None:
            return ids, bag_of_token, counted * per_sample_weights.reshape(-1).double()
        return ids, bag_of_token, counted

    def tokens(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor) -> TokenList:
        """The token list of the lookup ops, for the materialised per-sample gradients (``grad_sample``)."""
        batch_size = grad_output.shape[0]
        ids, bag_of_token, token_weights = self.token_weights(module, inputs, batch_size)
        dtype = torch.promote_types(grad_output.dtype, torch.float32)
        token_grads = grad_output.to(dtype)[bag_of_token].mul_(token_weights.to(dtype).unsqueeze(1))  # one [N, dim]
        return TokenList(ids, bag_of_token, token_grads, batch_size)

    def coefficients(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor) -> BagCoefficients:
        batch_size = grad_output.shape[0]
        tokens = self.token_weights(module, inputs, batch_size)
        return bag_coefficients(*tokens, batch_size, module.num_embeddings)

    def norm_bounds(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor):
        """The rank-one norm ``‖c_i‖‖g_i‖`` and the slack of the rows ``fl(fl(f_i c_iv) g_i)``
        (``fastdp.ops.embedding_bag``), from per-token scalars only."""
        if not self.trainable_params(module):
            return {}, {}
        norm_sq = bag_norm_sq(self.coefficients(module, inputs, grad_output), grad_output, module.num_embeddings)
        kappa = bag_clipped_sum_error(rounding.accumulation_dtype(grad_output))
        return {"weight": norm_sq}, {"weight": kappa * norm_sq.sqrt()}

    def clipped_grad(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor, clip_factors: ClipFactors):
        if not self.trainable_params(module):
            return {}
        grad = torch.zeros_like(module.weight, dtype=rounding.accumulation_dtype(grad_output))
        self.add_clipped_grad(module, inputs, grad_output, clip_factors, {"weight": grad})
        return {"weight": grad.to(module.weight.dtype)}

    def add_clipped_grad(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor,
                         clip_factors: ClipFactors, out: Dict[str, torch.Tensor]) -> None:
        """Scattered into ``out`` itself where it has the rows' dtype (float32, or float64 for float64)."""
        target = out.get("weight")
        if target is None:
            return
        dtype = rounding.accumulation_dtype(grad_output)
        bag = self.coefficients(module, inputs, grad_output)
        factors = factors_for(clip_factors, "weight")
        if target.dtype == dtype:
            add_bag_clipped_grad(target, bag, grad_output, factors, module.num_embeddings)
        else:
            grad = torch.zeros(target.shape, dtype=dtype, device=target.device)
            add_bag_clipped_grad(grad, bag, grad_output, factors, module.num_embeddings)
            target.add_(grad)

    def zero_samples(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor, rows: torch.Tensor):
        """Only the output gradient: the inputs' rows are tokens (flat ids and ``per_sample_weights``), and
        ``add_bag_clipped_grad`` adds zeros for a zeroed ``g_i`` whatever the sample's weights."""
        return inputs, zero_rows(grad_output, rows)


register_rule(EmbeddingBagRule())
