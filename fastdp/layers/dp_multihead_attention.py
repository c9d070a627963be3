"""Opacus's import path ``opacus.layers.dp_multihead_attention``: DPMultiheadAttention and SequenceBias."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..engine.rules import register_rule
from ..engine.rules.base import LayerRule
from .multihead_attention import DPMultiheadAttention


class SequenceBias(nn.Module):
    """Appends one learnable vector to the end of every sequence: ``[L, N, E] → [L+1, N, E]``
    (``[N, L, E] → [N, L+1, E]`` with ``batch_first=True``). Opacus's layer; fastdp's
    DPMultiheadAttention handles ``add_bias_kv`` itself and does not need it."""

    def __init__(self, embed_dim: int, batch_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.bias = nn.Parameter(torch.empty(embed_dim))
        nn.init.normal_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first:
            return torch.cat([x, self.bias.expand(x.shape[0], 1, -1)], 1)
        return torch.cat([x, self.bias.expand(1, x.shape[1], -1)], 0)


class SequenceBiasRule(LayerRule):
    """Sample i's gradient of the appended vector is the output gradient at its last position."""

    module_types = (SequenceBias,)

    def grad_sample(self, module: SequenceBias, inputs: tuple, grad_output: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not module.bias.requires_grad:
            return {}
        return {"bias": grad_output[:, -1]}  # the engine hands grad_output batch-first


register_rule(SequenceBiasRule())

__all__ = ["DPMultiheadAttention", "SequenceBias"]
