"""PackedSequence helpers (Opacus's ``opacus.utils.packed_sequences``)."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def compute_seq_lengths(batch_sizes: torch.Tensor) -> List[int]:
    """The length of each sequence of a PackedSequence (longest first) from its ``batch_sizes``."""
    batch_sizes = [int(b) for b in batch_sizes]
    return [sum(1 for b in batch_sizes if b > i) for i in range(batch_sizes[0])] if batch_sizes else []


def unpack_packedsequences(packed: PackedSequence) -> List[torch.Tensor]:
    """The list of per-sequence tensors ``[T_i, ...]`` (in the original order) that ``packed`` was made from."""
    padded, lengths = pad_packed_sequence(packed, batch_first=True)  # original order, with lengths
    return [padded[i, : int(length)] for i, length in enumerate(lengths)]


def _gen_packed_data(minibatch_size: int, max_seq_length: int, input_dim: int, batch_first: bool,
                     sorted_: Optional[bool] = False) -> PackedSequence:
    """A random PackedSequence of ``minibatch_size`` sequences of 1..max_seq_length steps (for tests);
    ``sorted_``: lengths in decreasing order, packed with ``enforce_sorted=True``."""
    lengths = torch.randint(1, max_seq_length + 1, (minibatch_size,))
    if sorted_:
        lengths = lengths.sort(descending=True).values
    padded = torch.zeros(minibatch_size, max_seq_length, input_dim)
    for i, length in enumerate(lengths.tolist()):
        padded[i, :length] = torch.randn(length, input_dim)
    if not batch_first:
        padded = padded.transpose(0, 1)
    return pack_padded_sequence(padded, lengths, batch_first=batch_first, enforce_sorted=bool(sorted_))
