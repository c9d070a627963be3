"""DP drop-in replacements for torch layers whose per-sample gradients a plain capture cannot see.

``DPLSTM``, ``DPGRU``, ``DPRNN`` and ``DPMultiheadAttention`` take the torch modules' arguments and
state_dict keys. Importing this package registers their engine rule; ``ModuleValidator.fix``
swaps the torch layers for them (nn.LSTM → DPLSTM, ...), keeping the weights.
"""

from .multihead_attention import DPMultiheadAttention
from .dp_multihead_attention import SequenceBias  # Opacus's layer, with its rule
from .rnn import DPGRU, DPLSTM, DPRNN, DPRNNBase

__all__ = ["DPLSTM", "DPGRU", "DPRNN", "DPRNNBase", "DPMultiheadAttention", "SequenceBias"]

