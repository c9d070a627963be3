"""DPDataLoader: a DataLoader that draws Poisson batches and can hand the model an empty one."""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Callable, List, Optional

import torch
from scipy.stats import binom
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler
from torch.utils.data._utils.collate import default_collate

from ..accountants.validation import check_delta, check_sample_rate
from .distributed_sampler import DistributedUniformWithReplacementSampler
from .samplers import UniformWithReplacementSampler
from ..utils.secure_random import SecureRandom


def _map_samples(batch: Any, on_tensor: Callable, on_values: Callable, path: str = "batch") -> Any:
    """``batch`` (a collated batch) with the same structure, its per-sample parts transformed.

    ``on_tensor`` gets every tensor (samples along dim 0); ``on_values`` every list or tuple of
    plain values (e.g. strings, which ``default_collate`` leaves as a per-sample list). Any other
    leaf could be data of the samples the batch came from, so it is refused rather than copied
    into an empty batch or into padding rows that must hold no data.
    """
    if isinstance(batch, torch.Tensor):
        return on_tensor(batch)
    if isinstance(batch, Mapping):
        return type(batch)(
            {key: _map_samples(value, on_tensor, on_values, f"{path}[{key!r}]") for key, value in batch.items()}
        )
    if isinstance(batch, tuple) and hasattr(type(batch), "_fields"):  # namedtuple: keep its fields
        fields = (_map_samples(getattr(batch, f), on_tensor, on_values, f"{path}.{f}") for f in batch._fields)
        return type(batch)(*fields)
    if isinstance(batch, (list, tuple)):
        if not any(isinstance(item, (torch.Tensor, Mapping, list, tuple)) for item in batch):
            return on_values(batch)
        return type(batch)(_map_samples(item, on_tensor, on_values, f"{path}[{i}]") for i, item in enumerate(batch))
    raise TypeError(
        f"Unsupported batch type: DPDataLoader cannot build an empty or padded Poisson batch: collate_fn output holds a "
        f"{type(batch).__name__} at {path}; make collate_fn return tensors (or per-sample lists) there"
    )


def _empty_batch_like(batch: Any, batch_first: bool = True) -> Any:
    """``batch`` with every sample removed: tensors keep dtype, device and their other dimensions
    (the batch dimension is 0, or 1 with ``batch_first=False`` for tensors of 2+ dimensions)."""

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, :0] if not batch_first and tensor.dim() >= 2 else tensor[:0]

    return _map_samples(batch, empty, lambda values: type(values)())


def _random_batch_like(batch: Any, batch_first: bool = True) -> Any:
    """One made-up sample of 0/1 values in ``batch``'s structure (Opacus's ``rand_on_empty``)."""

    def one(tensor: torch.Tensor) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[1 if not batch_first and tensor.dim() >= 2 else 0] = 1
        return torch.randint(0, 2, shape, device=tensor.device).to(tensor.dtype)

    return _map_samples(batch, one, lambda values: type(values)([None]))


def _padded(batch: Any, size: int) -> Any:
    """``batch`` (of at most ``size`` samples) grown to ``size`` rows: zero rows of each tensor's
    trailing shape and dtype, ``None`` entries in per-sample lists."""

    def pad_tensor(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros((size - len(tensor), *tensor.shape[1:]))])

    return _map_samples(batch, pad_tensor, lambda values: type(values)([*values, *[None] * (size - len(values))]))


def _with_mask(batch: Any, mask: torch.Tensor) -> Any:
    """The mask appended last to a list/tuple batch, as key "mask" of a dict; else ``(batch, mask)``."""
    if isinstance(batch, Mapping):
        return type(batch)({**batch, "mask": mask})
    if isinstance(batch, (list, tuple)) and not hasattr(type(batch), "_fields"):
        return type(batch)([*batch, mask])
    return batch, mask


def _mask_of(batch: Any) -> torch.Tensor:
    return batch["mask"] if isinstance(batch, Mapping) else batch[-1]


def _check_padded_batch_size(value) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise ValueError(f"padded_batch_size must be None or an int >= 1, got {value!r}")
    return value


def suggested_padded_batch_size(num_samples: int, sample_rate: float, overflow_probability: float = 1e-6) -> int:
    """Smallest N with P(Binomial(num_samples, sample_rate) > N) <= overflow_probability.

    A padded batch size chosen this way keeps batch shapes fixed on all but about one step in
    ``1 / overflow_probability``; larger Poisson batches are yielded whole (never truncated).
    """
    if isinstance(num_samples, bool) or not (isinstance(num_samples, numbers.Integral) and num_samples > 0):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    sample_rate = check_sample_rate(sample_rate)
    overflow_probability = check_delta(overflow_probability, "overflow_probability")
    size = int(binom.isf(overflow_probability, num_samples, sample_rate))
    while size > 0 and binom.sf(size - 1, num_samples, sample_rate) <= overflow_probability:  # isf is approximate
        size -= 1
    while binom.sf(size, num_samples, sample_rate) > overflow_probability:
        size += 1
    return max(size, 1)


class CollateWithEmptyBatches:
    """Wraps a collate function so that an empty list of samples collates to an empty batch, and
    optionally pads every batch to a fixed size with a 0/1 mask.

    Poisson sampling yields empty batches (probability ``(1 - q) ** N``), and most collate
    functions crash on them. The empty batch is inferred once, at construction, by collating the
    dataset's first sample and cutting every tensor to length 0; so it has the structure, dtypes
    and trailing shapes the model sees on ordinary batches, and a forward pass on it gives an
    empty output. Only this small template is kept, so pickling to workers stays cheap.

    With ``padded_batch_size``, a batch of ``b <= padded_batch_size`` samples (the empty one
    included) gets zero rows up to that size, so CUDA graphs and torch.compile see one shape; the
    float mask ``[1.0] * b + [0.0] * padding`` tells the loss which rows are real. A larger batch is
    left whole (all-ones mask): truncating it would change the sampling the accountant assumes.
    """

    def __init__(
        self, collate_fn: Callable[[List[Any]], Any], first_sample: Any, padded_batch_size: Optional[int] = None,
        batch_first: bool = True, rand_on_empty: bool = False,
    ):
        self.collate_fn = collate_fn
        self.padded_batch_size = padded_batch_size
        self.batch_first = batch_first
        self.rand_on_empty = rand_on_empty
        if rand_on_empty and padded_batch_size is not None:
            raise ValueError("rand_on_empty and padded_batch_size exclude each other (padding already fixes shapes)")
        try:
            self.empty_batch, self.unsupported = _empty_batch_like(collate_fn([first_sample]), batch_first), None
        except TypeError as error:  # only fatal if an empty batch is ever drawn, or every batch is padded
            if padded_batch_size is not None:
                raise
            self.empty_batch, self.unsupported = None, error
        if padded_batch_size is not None and isinstance(self.empty_batch, Mapping) and "mask" in self.empty_batch:
            raise ValueError('padded_batch_size adds key "mask" to each batch, but collate_fn output already has one')

    def __call__(self, samples: List[Any]) -> Any:
        if len(samples) > 0:
            batch = self.collate_fn(samples)
        elif self.unsupported is not None:
            raise self.unsupported
        else:
            template = self.empty_batch  # fresh containers: callers may mutate a batch
            if self.rand_on_empty:  # one made-up sample: not data, so privacy is unaffected; its clipped gradient enters the step
                return _random_batch_like(template, self.batch_first)
            batch = _empty_batch_like(template, self.batch_first)
        if self.padded_batch_size is None:
            return batch
        mask = torch.zeros(max(len(samples), self.padded_batch_size))
        mask[: len(samples)] = 1.0
        return _with_mask(batch if len(samples) == len(mask) else _padded(batch, len(mask)), mask)


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


def _replicas(data_loader: DataLoader) -> int:
    """Over how many ranks ``data_loader``'s sampler splits the dataset (1: it does not)."""
    batch_sampler = data_loader.batch_sampler
    if isinstance(batch_sampler, DistributedUniformWithReplacementSampler):
        return batch_sampler.num_replicas
    sampler = getattr(batch_sampler, "sampler", None)
    return sampler.num_replicas if isinstance(sampler, DistributedSampler) else 1


def distributed_sample_rate(data_loader: DataLoader) -> float:
    """The global Poisson rate for a loader that already splits the data over all ranks."""
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    sampler = getattr(data_loader.batch_sampler, "sampler", None)
    if not isinstance(sampler, DistributedSampler) and not isinstance(
        data_loader.batch_sampler, DistributedUniformWithReplacementSampler
    ):
        raise ValueError(
            "distributed=True needs a data_loader that splits the dataset over the ranks: build it with "
            "sampler=DistributedSampler(dataset) (batch_size per rank) or use DPDataLoader(dataset, "
            "sample_rate=q, distributed=True); a loader over the whole dataset would sample every example on every rank"
        )
    if _replicas(data_loader) != world_size:
        raise ValueError(
            f"data_loader's sampler splits the dataset over {_replicas(data_loader)} ranks but the process group "
            f"has {world_size}; build the sampler with num_replicas equal to the world size"
        )
    if isinstance(data_loader.batch_sampler, DistributedUniformWithReplacementSampler):
        return data_loader.batch_sampler.sample_rate
    return 1 / len(data_loader)


class DPDataLoader(DataLoader):
    """DataLoader whose batches are Poisson samples of the dataset.

    Each of the ``int(1 / sample_rate)`` batches of an epoch includes every sample independently
    with probability ``sample_rate``, so batch sizes vary and a batch may be empty (see
    ``CollateWithEmptyBatches``). Other DataLoader arguments (``num_workers``, ``pin_memory``, ...)
    pass through ``kwargs``; ``generator`` drives the sampling, so a seeded one reproduces it.

    ``padded_batch_size=N`` gives static shapes (CUDA graphs, torch.compile): each batch of
    ``b <= N`` samples gets ``N - b`` zero rows and a float mask ``[N]`` appended last (key "mask"
    for a dict batch; see ``CollateWithEmptyBatches``). Weight the per-sample loss with it,
    ``(F.cross_entropy(out, y, reduction="none") * mask).sum() / N`` for loss_reduction="mean"
    (the engine rescales by the batch dimension, N) or ``.sum()`` for "sum": padding rows then
    have zero gradients and add nothing to the clipped sum. Sampling is unchanged; a batch larger
    than N is yielded whole, with a one-time RuntimeWarning (``suggested_padded_batch_size``).

    ``distributed=True`` (one process per rank, after ``init_process_group``): this rank's share
    of one Poisson sample of the whole dataset per step (``DistributedUniformWithReplacementSampler``;
    construct it on every rank, it agrees a sampling seed with one broadcast). ``sample_rate`` is
    the global rate and ``expected_batch_size`` the global mean batch, summed over ranks.

    ``batch_first=False``: an empty batch is empty along dimension 1 (sequence-first tensors).
    ``rand_on_empty=True`` (Opacus): an empty Poisson batch is replaced by one made-up sample of 0/1
    values, for models that cannot run on an empty batch. It is not data, so privacy is unaffected,
    but its clipped gradient (at most C) enters that step's sum.
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
        padded_batch_size: Optional[int] = None,
        batch_first: bool = True,
        rand_on_empty: bool = False,
        **kwargs,
    ):
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
        if distributed:  # this rank's share of one Poisson sample of the whole dataset
            batch_sampler = DistributedUniformWithReplacementSampler(
                total_size=len(dataset), sample_rate=sample_rate, generator=generator
            )
        else:
            batch_sampler = UniformWithReplacementSampler(
                num_samples=len(dataset), sample_rate=sample_rate, generator=generator
            )
        self.sample_rate = sample_rate
        self.distributed = distributed
        self.padded_batch_size = _check_padded_batch_size(padded_batch_size)
        self._overflow_warned = False
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=CollateWithEmptyBatches(
                default_collate if collate_fn is None else collate_fn, dataset[0], padded_batch_size,
                batch_first=batch_first, rand_on_empty=rand_on_empty,
            ),
            generator=None if isinstance(generator, SecureRandom) else generator,  # workers' seeds only
            **kwargs,
        )

    def __iter__(self):
        batches = super().__iter__()
        return batches if self.padded_batch_size is None else self._warn_on_overflow(batches)

    def _warn_on_overflow(self, batches):
        """Checks in the main process (collation may run in workers), so the warning shows once."""
        for batch in batches:
            size = len(_mask_of(batch))
            if size > self.padded_batch_size and not self._overflow_warned:
                self._overflow_warned = True
                n, q = len(self.dataset), self.sample_rate
                warnings.warn(
                    f"DPDataLoader drew a Poisson batch of {size} > padded_batch_size="
                    f"{self.padded_batch_size} samples (probability {binom.sf(self.padded_batch_size, n, q):.3g} "
                    f"per step) and yielded it whole, since truncating would break the privacy accounting; "
                    f"shapes change on such steps. padded_batch_size={suggested_padded_batch_size(n, q)} "
                    f"overflows with probability <= 1e-6 (suggested_padded_batch_size)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            yield batch

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
        padded_batch_size: Optional[int] = None,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ) -> "DPDataLoader":
        """A DPDataLoader over ``data_loader``'s dataset with the same mean batch size.

        ``sample_rate = 1 / len(data_loader)``, so an epoch still has ``len(data_loader)`` steps.
        Worker, pinning and collate settings are kept; its sampler, batch sampler and ``drop_last``
        are replaced by Poisson sampling (with one warning if they were not the defaults).
        ``generator`` and ``padded_batch_size`` default to ``data_loader``'s.

        ``distributed=True`` (under DDP/FSDP, one process per rank): ``data_loader`` must already
        split the dataset over the ranks, with ``sampler=DistributedSampler(dataset)`` (its
        ``batch_size`` is per rank, so the global expected batch is world size × batch_size and
        ``sample_rate = 1 / len(data_loader)``) or as a distributed DPDataLoader (its rate is kept).
        A loader over the whole dataset (Opacus's DDP tutorial: the same ``DataLoader(ds,
        batch_size=64)`` on every rank) is split as Opacus does: ``sample_rate = 1 / len(data_loader)``
        is the *global* rate, each rank draws its share of one Poisson sample (the global expected
        batch is ``batch_size``, about ``batch_size / world_size`` per rank).
        ``batch_first`` / ``rand_on_empty``: see the class.
        """
        if data_loader.batch_sampler is None:
            raise ValueError(
                "data_loader has batch_size=None (no automatic batching); DPDataLoader draws the "
                "batches itself, so build data_loader with a batch_size"
            )
        if distributed and _replicas(data_loader) == 1 and not isinstance(
            data_loader.batch_sampler, DistributedUniformWithReplacementSampler
        ):
            sample_rate = 1 / len(data_loader)  # the whole dataset's loader: its rate is the global one
        else:
            sample_rate = distributed_sample_rate(data_loader) if distributed else 1 / len(data_loader)
        if not distributed and _replicas(data_loader) > 1:
            raise ValueError(
                f"data_loader splits the dataset over {_replicas(data_loader)} ranks; pass distributed=True "
                "(make_private does for a model wrapped in DDP/DPDDP or sharded with fully_shard)"
            )
        ignored = []
        batch_sampler = data_loader.batch_sampler
        if type(batch_sampler) is BatchSampler:
            if not isinstance(batch_sampler.sampler, (SequentialSampler, RandomSampler, DistributedSampler)):
                ignored.append(f"the sampler ({type(batch_sampler.sampler).__name__})")
        elif not isinstance(batch_sampler, (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)):
            ignored.append(f"the batch_sampler ({type(batch_sampler).__name__})")
        if data_loader.drop_last:
            ignored.append("drop_last=True")
        if ignored:
            _warn_ignored(ignored)
        return cls(
            data_loader.dataset,
            sample_rate=sample_rate,
            collate_fn=data_loader.collate_fn,
            generator=generator if generator is not None else data_loader.generator,
            distributed=distributed,
            padded_batch_size=(
                padded_batch_size if padded_batch_size is not None else getattr(data_loader, "padded_batch_size", None)
            ),
            batch_first=batch_first,
            rand_on_empty=rand_on_empty,
            **worker_settings(data_loader),
        )


def switch_generator(*, data_loader: DataLoader, generator) -> DataLoader:
    """A copy of ``data_loader`` whose sampling draws from ``generator`` (e.g. the CSPRNG of secure mode).

    Poisson batch samplers are rebuilt with it; a ``BatchSampler`` over a ``RandomSampler`` gets a new
    ``RandomSampler`` with it; a sequential loader draws nothing: an error.
    """
    batch_sampler = data_loader.batch_sampler
    if isinstance(batch_sampler, UniformWithReplacementSampler):
        batch_sampler = UniformWithReplacementSampler(
            num_samples=batch_sampler.num_samples, sample_rate=batch_sampler.sample_rate, generator=generator,
            steps=batch_sampler.steps,
        )
    elif isinstance(batch_sampler, DistributedUniformWithReplacementSampler):
        batch_sampler = DistributedUniformWithReplacementSampler(
            total_size=batch_sampler.total_size, sample_rate=batch_sampler.sample_rate,
            num_replicas=batch_sampler.num_replicas, rank=batch_sampler.rank, generator=generator,
            steps=batch_sampler.steps,
        )
    elif isinstance(batch_sampler, BatchSampler) and isinstance(batch_sampler.sampler, RandomSampler):
        sampler = batch_sampler.sampler
        batch_sampler = BatchSampler(
            RandomSampler(sampler.data_source, replacement=sampler.replacement, num_samples=sampler._num_samples,
                          generator=generator),
            batch_size=batch_sampler.batch_size, drop_last=batch_sampler.drop_last,
        )
    elif batch_sampler is None or isinstance(getattr(batch_sampler, "sampler", None), SequentialSampler):
        raise ValueError(
            "switch_generator: data_loader reads its data in order and draws nothing, so there is no generator to "
            "switch; shuffle (shuffle=True) or use a DPDataLoader"
        )
    else:
        raise ValueError(
            f"switch_generator cannot rebuild a {type(batch_sampler).__name__} with another generator; use a "
            "DPDataLoader, or a DataLoader with shuffle=True"
        )
    loader_generator = generator if isinstance(generator, torch.Generator) else None  # workers' seeds, as torch
    if isinstance(data_loader, DPDataLoader):
        copy_ = copy.copy(data_loader)
        object.__setattr__(copy_, "batch_sampler", batch_sampler)  # DataLoader forbids setting these after init
        object.__setattr__(copy_, "generator", loader_generator)
        return copy_
    return DataLoader(data_loader.dataset, batch_sampler=batch_sampler, collate_fn=data_loader.collate_fn,
                      generator=loader_generator, **worker_settings(data_loader))
