"""DP drop-in replacements for torch layers whose per-sample gradients a plain capture cannot see.

``DPLSTM``, ``DPGRU``, ``DPRNN`` and ``DPMultiheadAttention`` take the torch modules' arguments and
state_dict keys. Importing this package registers their engine rule and the
``ModuleValidator.fix`` replacements (nn.LSTM → DPLSTM, ...), which keep the weights.
"""

from torch import nn

from ..validators.module_validator import ModuleValidator
from .dp_multihead_attention import DPMultiheadAttention, SequenceBias
from .rnn import DPGRU, DPLSTM, DPRNN, DPRNNBase

__all__ = ["DPLSTM", "DPGRU", "DPRNN", "DPRNNBase", "DPMultiheadAttention", "SequenceBias"]

for _torch_type, _dp_type in (
    (nn.LSTM, DPLSTM), (nn.GRU, DPGRU), (nn.RNN, DPRNN), (nn.MultiheadAttention, DPMultiheadAttention)
):
    ModuleValidator.FIXERS[_torch_type] = lambda module, _dp_type=_dp_type, **_: _dp_type.from_module(module)
