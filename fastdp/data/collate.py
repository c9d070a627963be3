"""Opacus's stateful empty-batch collate (``opacus.data_loader.CollateFnWithEmpty``).

``DPDataLoader`` itself uses ``CollateWithEmptyBatches``, which learns the empty batch from the
dataset's first sample at construction, so even a first empty batch has the right structure. This
class is Opacus's: it learns the structure from the first non-empty batch it collates.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, List, Optional, Sequence

import torch

from .data_loader import _empty_batch_like, _random_batch_like

logger = logging.getLogger(__name__)


class CollateFnWithEmpty:
    """Collates with ``collator_fn`` (the list of samples as is when None); an empty list of samples
    gives an empty batch shaped like the first non-empty one (batch dimension 0, or 1 with
    ``batch_first=False``), or with ``rand_on_empty`` one made-up 0/1 sample. Before any non-empty batch:
    zero-length tensors of ``sample_empty_shapes`` / ``dtypes`` when given, else ``[]`` (with a warning)."""

    def __init__(self, collator_fn: Optional[Callable[[List[Any]], Any]], batch_first: bool = True,
                 rand_on_empty: bool = False, sample_empty_shapes: Optional[Sequence[tuple]] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None):
        self.wrapped_collator_fn = collator_fn
        self.batch_first = batch_first
        self.rand_on_empty = rand_on_empty
        self.sample_empty_shapes = sample_empty_shapes
        self.dtypes = dtypes
        self.first_batch = None

    def __call__(self, batch: List[Any]) -> Any:
        if len(batch) > 0:
            output = self.wrapped_collator_fn(batch) if self.wrapped_collator_fn else batch
            if self.first_batch is None:
                self.first_batch = copy.deepcopy(output)
            return output
        if self.first_batch is None:
            logger.warning("the first batch is empty, so its structure is unknown: using %s; use more data or "
                           "a larger sample rate", "zero-length tensors" if self.sample_empty_shapes else "[]")
            if self.sample_empty_shapes is not None and self.dtypes is not None:
                return [torch.zeros(shape, dtype=dtype) for shape, dtype in zip(self.sample_empty_shapes, self.dtypes)]
            return []
        if self.rand_on_empty:
            return _random_batch_like(self.first_batch, self.batch_first)
        return _empty_batch_like(self.first_batch, self.batch_first)


def wrap_collate_with_empty(*, collate_fn: Optional[Callable[[List[Any]], Any]], batch_first: bool = True,
                            rand_on_empty: bool = False, sample_empty_shapes: Optional[Sequence[tuple]] = None,
                            dtypes: Optional[Sequence[torch.dtype]] = None) -> CollateFnWithEmpty:
    """``collate_fn`` made safe for empty Poisson batches (see ``CollateFnWithEmpty``)."""
    return CollateFnWithEmpty(collate_fn, batch_first=batch_first, rand_on_empty=rand_on_empty,
                              sample_empty_shapes=sample_empty_shapes, dtypes=dtypes)


__all__ = ["CollateFnWithEmpty", "wrap_collate_with_empty"]
