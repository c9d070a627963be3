"""nn.MultiheadAttention: its projections run inside one functional call that no capture can see
into, so its rule asks for ``fastdp.layers.DPMultiheadAttention`` (``ModuleValidator.fix`` swaps it
in). DPMultiheadAttention itself is handled by ``rnn.SequenceLinearRule`` through its capture points."""

from __future__ import annotations

from torch import nn

from . import register_rule
from .rnn import ReplaceWithDPLayerRule

register_rule(ReplaceWithDPLayerRule("DPMultiheadAttention"), nn.MultiheadAttention)
