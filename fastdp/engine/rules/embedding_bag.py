"""Rule for nn.EmbeddingBag (modes "sum" and "mean"): one bag is one sample.

Each token of a bag receives the bag's output gradient times its weight in the bag
(``per_sample_weights`` in sum mode, 1 / number of non-padding tokens in mean mode), which
turns the call into the token list of the embedding ops. Gradients are dense, as for
nn.Embedding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import register_rule
from .base import zero_rows
from .embedding import EmbeddingLookupRule, TokenList


class EmbeddingBagRule(EmbeddingLookupRule):
    """Inputs ``(input, offsets=None, per_sample_weights=None)`` as nn.EmbeddingBag.forward takes them:
    ``input`` [B, L] (fixed-size bags), or 1-D with ``offsets`` (B or, with include_last_offset, B + 1)."""

    module_types = (nn.EmbeddingBag,)

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

    def tokens(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor) -> TokenList:
        ids, offsets, per_sample_weights = (tuple(inputs) + (None, None))[:3]
        batch_size = grad_output.shape[0]
        device = ids.device
        weight_dtype = torch.promote_types(grad_output.dtype, torch.float32)
        counted = torch.ones(ids.numel(), dtype=weight_dtype, device=device)
        if ids.dim() == 2:
            bag_of_token = torch.arange(batch_size, device=device).repeat_interleave(ids.shape[1])
        else:
            positions = torch.arange(ids.numel(), dtype=offsets.dtype, device=device)
            bag_of_token = torch.searchsorted(offsets[:batch_size], positions, right=True).long() - 1
            if module.include_last_offset:  # the forward ignores tokens past the last offset
                counted = counted * (positions < offsets[batch_size])
        ids = ids.reshape(-1).long()
        if module.padding_idx is not None:  # excluded from the bag, also from the mean's count
            counted = counted * (ids != module.padding_idx)
        if module.mode == "mean":
            bag_sizes = torch.zeros(batch_size, dtype=weight_dtype, device=device).index_add_(0, bag_of_token, counted)
            token_weights = counted / bag_sizes.clamp(min=1)[bag_of_token]
        elif per_sample_weights is not None:
            token_weights = counted * per_sample_weights.reshape(-1).to(weight_dtype)
        else:
            token_weights = counted
        token_grads = grad_output.to(weight_dtype)[bag_of_token].mul_(token_weights.unsqueeze(1))  # one [N, dim]
        return TokenList(ids, bag_of_token, token_grads, batch_size)

    def zero_samples(self, module: nn.EmbeddingBag, inputs: tuple, grad_output: torch.Tensor, rows: torch.Tensor):
        """Only the output gradient: the inputs' rows are tokens (flat ids and ``per_sample_weights``), and a
        zeroed ``g_i`` zeroes every token gradient of bag i whatever its weights."""
        return inputs, zero_rows(grad_output, rows)


register_rule(EmbeddingBagRule())
