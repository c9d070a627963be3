"""Opacus's import path ``opacus.layers.dp_rnn``: the DP recurrent layers.

fastdp's DPLSTM/DPGRU/DPRNN clip their input and recurrent weights as sequence-linear layers
(time steps stacked), so Opacus's per-step cells and ``RNNLinear`` have no counterpart here.
"""

from .rnn import DPGRU, DPLSTM, DPRNN, DPRNNBase

__all__ = ["DPRNN", "DPGRU", "DPLSTM", "DPRNNBase"]
