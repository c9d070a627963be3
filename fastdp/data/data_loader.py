"""DPDataLoader: a DataLoader that draws Poisson batches and can hand the model an empty one."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, List, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from .samplers import UniformWithReplacementSampler


def _empty_batch_like(batch: Any, path: str = "batch") -> Any:
    """``batch`` (a collated batch) with the same structure and every sample removed.

    Tensors keep dtype, device and trailing shape with a leading dimension of 0; a list or tuple
    of plain values (e.g. strings, which ``default_collate`` leaves as a per-sample list) becomes
    empty. Any other non-tensor leaf could be data of the sample the template came from, so it
    is refused rather than copied into a batch that must hold no data.
    """
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        return type(batch)({key: _empty_batch_like(value, f"{path}[{key!r}]") for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(type(batch), "_fields"):  # namedtuple: keep its fields
        return type(batch)(*(_empty_batch_like(getattr(batch, f), f"{path}.{f}") for f in batch._fields))
    if isinstance(batch, (list, tuple)):
        if not any(isinstance(item, (torch.Tensor, Mapping, list, tuple)) for item in batch):
            return type(batch)()
        return type(batch)(_empty_batch_like(item, f"{path}[{i}]") for i, item in enumerate(batch))
    raise TypeError(
        f"DPDataLoader cannot build an empty Poisson batch: collate_fn output holds a "
        f"{type(batch).__name__} at {path}; make collate_fn return tensors (or per-sample lists) there"
    )


class CollateWithEmptyBatches:
    """Wraps a collate function so that an empty list of samples collates to an empty batch.

    Poisson sampling yields empty batches (probability ``(1 - q) ** N``), and most collate
    functions crash on them. The empty batch is inferred once, at construction, by collating the
    dataset's first sample and cutting every tensor to length 0; so it has the structure, dtypes
    and trailing shapes the model sees on ordinary batches, and a forward pass on it gives an
    empty output. Only this small template is kept, so pickling to workers stays cheap.
    """

    def __init__(self, collate_fn: Callable[[List[Any]], Any], first_sample: Any):
        self.collate_fn = collate_fn
        try:
            self.empty_batch, self.unsupported = _empty_batch_like(collate_fn([first_sample])), None
        except TypeError as error:  # only fatal if an empty batch is ever drawn
            self.empty_batch, self.unsupported = None, error

    def __call__(self, samples: List[Any]) -> Any:
        if len(samples) > 0:
            return self.collate_fn(samples)
        if self.unsupported is not None:
            raise self.unsupported
        return _empty_batch_like(self.empty_batch)  # fresh containers: callers may mutate a batch


def _warn_ignored(settings: List[str]) -> None:
    warnings.warn(
        f"DPDataLoader ignores {', '.join(settings)}: it draws each batch by Poisson sampling over the "
        "whole dataset (each sample independently with probability sample_rate), which is what the "
        "privacy accounting assumes",
        UserWarning,
        stacklevel=3,
    )


def worker_settings(data_loader: DataLoader) -> dict:
    """The loading settings a re-batched copy of ``data_loader`` keeps (workers, pinning, timeouts)."""
    return dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        prefetch_factor=data_loader.prefetch_factor,
        persistent_workers=data_loader.persistent_workers,
        pin_memory_device=data_loader.pin_memory_device,
    )


class DPDataLoader(DataLoader):
    """DataLoader whose batches are Poisson samples of the dataset.

    Each of the ``int(1 / sample_rate)`` batches of an epoch includes every sample independently
    with probability ``sample_rate``, so batch sizes vary and a batch may be empty (see
    ``CollateWithEmptyBatches``). Other DataLoader arguments (``num_workers``, ``pin_memory``, ...)
    pass through ``kwargs``; ``generator`` drives the sampling, so a seeded one reproduces it.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        drop_last: bool = False,
        generator: Optional[torch.Generator] = None,
        distributed: bool = False,
        **kwargs,
    ):
        if distributed:
            raise NotImplementedError(
                "DPDataLoader(distributed=True) is not implemented yet; the distributed issue adds "
                "DistributedUniformWithReplacementSampler"
            )
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style Dataset with __len__ (Poisson sampling draws indices), "
                f"got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError("dataset is empty; DPDataLoader needs at least one sample")
        if drop_last:
            _warn_ignored(["drop_last=True"])
        if isinstance(collate_fn, CollateWithEmptyBatches):  # re-wrapping a DPDataLoader's collate
            collate_fn = collate_fn.collate_fn
        batch_sampler = UniformWithReplacementSampler(
            num_samples=len(dataset), sample_rate=sample_rate, generator=generator
        )
        self.sample_rate = sample_rate
        self.distributed = distributed
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=CollateWithEmptyBatches(default_collate if collate_fn is None else collate_fn, dataset[0]),
            generator=generator,
            **kwargs,
        )

    @property
    def expected_batch_size(self) -> float:
        """Mean batch size ``sample_rate * len(dataset)``: what a "mean" loss divides by under DP."""
        return self.sample_rate * len(self.dataset)

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        generator: Optional[torch.Generator] = None,
        distributed: bool = False,
    ) -> "DPDataLoader":
        """A DPDataLoader over ``data_loader``'s dataset with the same mean batch size.

        ``sample_rate = 1 / len(data_loader)``, so an epoch still has ``len(data_loader)`` steps.
        Worker, pinning and collate settings are kept; its sampler, batch sampler and ``drop_last``
        are replaced by Poisson sampling (with one warning if they were not the defaults).
        ``generator`` defaults to ``data_loader``'s.
        """
        if data_loader.batch_sampler is None:
            raise ValueError(
                "data_loader has batch_size=None (no automatic batching); DPDataLoader draws the "
                "batches itself, so build data_loader with a batch_size"
            )
        ignored = []
        batch_sampler = data_loader.batch_sampler
        if type(batch_sampler) is BatchSampler:
            if not isinstance(batch_sampler.sampler, (SequentialSampler, RandomSampler)):
                ignored.append(f"the sampler ({type(batch_sampler.sampler).__name__})")
        elif not isinstance(batch_sampler, UniformWithReplacementSampler):
            ignored.append(f"the batch_sampler ({type(batch_sampler).__name__})")
        if data_loader.drop_last:
            ignored.append("drop_last=True")
        if ignored:
            _warn_ignored(ignored)
        return cls(
            data_loader.dataset,
            sample_rate=1 / len(data_loader),
            collate_fn=data_loader.collate_fn,
            generator=generator if generator is not None else data_loader.generator,
            distributed=distributed,
            **worker_settings(data_loader),
        )
