"""BatchMemoryManager: train on large logical (Poisson) batches in small physical pieces.

Each logical batch is split into chunks of at most ``max_physical_batch_size``;
every chunk but the last makes the next ``optimizer.step()`` a virtual step (the
clipped sums keep accumulating in ``p.grad``), so noise and accounting happen once
per logical batch. Flags travel in a queue consumed in batch order, so they stay
in step with training even when DataLoader workers prefetch ahead.

Leaving the loop or the ``with`` block in the middle of a logical batch (``break``, an exception)
discards that batch's partial clipped sum (``DPOptimizer.discard_virtual_batch``): it was never
noised nor counted by the accountant, and must not leak into a later step.
"""

from __future__ import annotations

import collections
import math
from typing import Deque, Iterator, List

from torch.utils.data import BatchSampler, DataLoader, Sampler

from ..data.data_loader import worker_settings


class _SplittingBatchSampler(Sampler):
    def __init__(self, batch_sampler, max_batch_size: int, last_chunk_flags: Deque[bool]):
        self.batch_sampler = batch_sampler
        self.max_batch_size = max_batch_size
        self.last_chunk_flags = last_chunk_flags

    def __iter__(self) -> Iterator[List[int]]:
        for indices in self.batch_sampler:
            indices = list(indices)
            chunks = [indices[i : i + self.max_batch_size] for i in range(0, len(indices), self.max_batch_size)] or [[]]
            for k, chunk in enumerate(chunks):
                self.last_chunk_flags.append(k == len(chunks) - 1)
                yield chunk

    def __len__(self) -> int:
        batch_sampler = self.batch_sampler
        sample_rate = getattr(batch_sampler, "sample_rate", None)
        num_samples = getattr(batch_sampler, "num_samples", None)
        if sample_rate is not None and num_samples is not None:
            expected_chunks = max(1, math.ceil(sample_rate * num_samples / self.max_batch_size))
            return len(batch_sampler) * expected_chunks  # an estimate: Poisson batch sizes vary
        if isinstance(batch_sampler, BatchSampler) and hasattr(batch_sampler.sampler, "__len__"):
            # fixed-size batches: exact, the last one may be short
            size, total = batch_sampler.batch_size, len(batch_sampler.sampler)
            full, last = divmod(total, size)
            chunks = full * math.ceil(size / self.max_batch_size)
            if last and not batch_sampler.drop_last:
                chunks += math.ceil(last / self.max_batch_size)
            return chunks
        return len(batch_sampler)


class _SignallingLoader:
    def __init__(self, loader: DataLoader, last_chunk_flags: Deque[bool], optimizer):
        self.loader, self.last_chunk_flags, self.optimizer = loader, last_chunk_flags, optimizer

    def __iter__(self):
        self.last_chunk_flags.clear()
        try:
            for batch in self.loader:
                self.optimizer.signal_skip_step(do_skip=not self.last_chunk_flags.popleft())
                yield batch
        finally:  # also on break (the loop drops this generator) and on an exception in the loop
            self.optimizer.discard_virtual_batch()

    def __len__(self) -> int:
        return len(self.loader)


class BatchMemoryManager:
    """Split each (Poisson) batch into physical batches of at most ``max_physical_batch_size``.

    ::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32, optimizer=optimizer) as batches:
            for x, y in batches:
                criterion(model(x), y).backward()
                optimizer.step()       # a virtual step except after a logical batch's last chunk
                optimizer.zero_grad()

    The logical batch, not the physical one, is what is clipped, noised and accounted: the
    clipped sums of its chunks accumulate in ``p.grad``, and only the step after its last
    chunk adds noise and tells the accountant. Memory follows ``max_physical_batch_size``.

    Args:
        data_loader: the DP data loader from ``PrivacyEngine.make_private`` (not one with
            ``padded_batch_size``: the chunks would undo the padding).
        max_physical_batch_size: the largest batch a forward/backward pass sees, ≥ 1.
        optimizer: the DPOptimizer from ``make_private``.

    Raises:
        ValueError: for a bad ``max_physical_batch_size``, an optimizer that is no DPOptimizer
            or cannot take virtual steps, or a padded data loader.
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        if not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be an int >= 1, got {max_physical_batch_size!r}")
        if not hasattr(optimizer, "discard_virtual_batch"):
            raise ValueError("optimizer must be a fastdp DPOptimizer (from PrivacyEngine.make_private)")
        if getattr(optimizer, "virtual_steps_unsupported", None):  # refused on every rank, before any batch
            raise ValueError(optimizer.virtual_steps_unsupported)
        if getattr(data_loader, "padded_batch_size", None) is not None:
            raise ValueError(
                "data_loader pads every batch to padded_batch_size, which BatchMemoryManager's physical chunks "
                "would undo; use one or the other (padded batches are for fixed shapes, not for memory)"
            )
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> _SignallingLoader:
        flags: Deque[bool] = collections.deque()
        source = self.data_loader
        sampler = _SplittingBatchSampler(source.batch_sampler, self.max_physical_batch_size, flags)
        loader = DataLoader(
            source.dataset,
            batch_sampler=sampler,
            collate_fn=source.collate_fn,
            generator=source.generator,
            **worker_settings(source),
        )
        return _SignallingLoader(loader, flags, self.optimizer)

    def __exit__(self, *exc) -> bool:
        self.optimizer.discard_virtual_batch()  # a logical batch left incomplete goes, never released
        return False
