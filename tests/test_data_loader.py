"""Poisson sampling statistics, empty batches, and DPDataLoader construction."""

from __future__ import annotations

import itertools
import math
import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, SubsetRandomSampler, TensorDataset

from fastdp.data import DPDataLoader, UniformWithReplacementSampler

N, Q = 1000, 0.01  # steps = 100 per epoch
EPOCHS = 20


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def epochs_of_batches(sample_rate: float, seed: int = 0):
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=sample_rate, generator=seeded(seed))
    return [list(sampler) for _ in range(EPOCHS)]


def test_len_is_steps():
    assert len(UniformWithReplacementSampler(num_samples=N, sample_rate=Q)) == 100
    assert len(UniformWithReplacementSampler(num_samples=N, sample_rate=0.3)) == 3
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=Q, steps=7)
    assert len(sampler) == len(list(sampler)) == 7
    assert len(DPDataLoader(TensorDataset(torch.zeros(10)), sample_rate=0.25)) == 4


@pytest.mark.parametrize("true_rate_factor", [1.0, 1.5])
def test_batch_sizes_are_binomial(true_rate_factor):
    """Mean and variance of batch sizes match Binomial(N, q); a sampler at 1.5 q fails the same check."""
    batches = [b for epoch in epochs_of_batches(Q * true_rate_factor) for b in epoch]
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    n, mean, var = len(sizes), N * Q, N * Q * (1 - Q)
    mean_ok = abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / n)
    var_ok = abs(sizes.var().item() - var) < 5 * math.sqrt(2 * var**2 / n)  # sd of a sample variance, ~normal
    assert (mean_ok and var_ok) == (true_rate_factor == 1.0)


def test_each_index_included_with_probability_q():
    counts = torch.zeros(N)
    batches = [b for epoch in epochs_of_batches(Q) for b in epoch]
    for batch in batches:
        assert len(set(batch)) == len(batch) and all(0 <= i < N for i in batch)
        counts[batch] += 1
    expected, sd = len(batches) * Q, math.sqrt(len(batches) * Q * (1 - Q))
    assert abs(counts.mean().item() - expected) < 5 * sd / math.sqrt(N)
    assert (counts - expected).abs().max().item() < 5 * sd  # no index favoured or starved
    assert abs(counts.var().item() / sd**2 - 1) < 0.3  # spread of a binomial, not of a fixed schedule


def test_steps_are_independent_not_an_epoch_permutation():
    """Distinct indices per epoch ≈ N (1 - (1 - q)^steps), not N as with shuffling."""
    distinct = torch.tensor([float(len(set(itertools.chain(*epoch)))) for epoch in epochs_of_batches(Q)])
    p_seen = 1 - (1 - Q) ** 100
    expected, sd = N * p_seen, math.sqrt(N * p_seen * (1 - p_seen))
    assert abs(distinct.mean().item() - expected) < 5 * sd / math.sqrt(EPOCHS)


def test_seeded_generator_reproduces_batches():
    assert epochs_of_batches(Q, seed=3) == epochs_of_batches(Q, seed=3)
    assert epochs_of_batches(Q, seed=3) != epochs_of_batches(Q, seed=4)
    dataset = TensorDataset(torch.arange(50))
    runs = [[b[0].tolist() for b in DPDataLoader(dataset, sample_rate=0.1, generator=seeded(7))] for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), float("inf"), "0.1"])
def test_bad_sample_rate(bad):
    with pytest.raises(ValueError, match="sample_rate"):
        UniformWithReplacementSampler(num_samples=N, sample_rate=bad)
    with pytest.raises(ValueError, match="sample_rate"):
        DPDataLoader(TensorDataset(torch.zeros(10)), sample_rate=bad)


def test_dataset_without_len_is_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    with pytest.raises(TypeError, match="__len__"):
        DPDataLoader(Stream(), sample_rate=0.1)
    with pytest.raises(ValueError, match="empty"):
        DPDataLoader(TensorDataset(torch.zeros(0)), sample_rate=0.1)


def test_distributed_needs_a_process_group():  # the distributed cases: tests/test_distributed_ddp.py
    with pytest.raises(ValueError, match="init_process_group"):
        DPDataLoader(TensorDataset(torch.zeros(10)), sample_rate=0.1, distributed=True)


def first_empty_batch(loader: DataLoader):
    return next(itertools.islice(loader, 1))


def test_empty_batch_of_tuple_dataset():
    dataset = TensorDataset(torch.randn(20, 3, 4, dtype=torch.float64), torch.randint(0, 5, (20,)))
    x, y = first_empty_batch(DPDataLoader(dataset, sample_rate=1e-9))  # len() is huge: take one batch
    assert x.shape == (0, 3, 4) and x.dtype == torch.float64
    assert y.shape == (0,) and y.dtype == torch.int64
    assert nn.Linear(4, 2).double()(x).shape == (0, 3, 2)  # forward gives an empty output


Pair = namedtuple("Pair", "a b")


class DictDataset(Dataset):
    """Nested dict / tuple / list samples with Python numbers and strings."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {
            "image": torch.full((2, 5), float(i), dtype=torch.float16),
            "label": i,
            "weight": 0.5,
            "flag": True,
            "name": f"sample{i}",
            "nested": (torch.zeros(3, dtype=torch.int32), [i, 2.0]),
            "pair": Pair(torch.ones(1), i),
        }


def test_empty_batch_of_dict_dataset_matches_a_real_batch():
    loader = DPDataLoader(DictDataset(), sample_rate=1e-9)
    empty, real = first_empty_batch(loader), loader.collate_fn([DictDataset()[0], DictDataset()[1]])
    assert empty["name"] == [] and real["name"] == ["sample0", "sample1"]

    def leaves(batch):
        return [(t.dtype, t.shape[1:]) for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]

    assert leaves(empty) == leaves(real)
    assert all(t.shape[0] == 0 for t in torch.utils._pytree.tree_leaves(empty) if isinstance(t, torch.Tensor))
    assert empty["label"].dtype == torch.int64 and empty["weight"].dtype == torch.float64
    assert empty["flag"].dtype == torch.bool and empty["image"].shape == (0, 2, 5)
    assert isinstance(empty["pair"], Pair) and empty["pair"].a.shape == (0, 1)
    empty.pop("image")  # a caller mutating one empty batch does not change the next
    assert "image" in first_empty_batch(loader)


def test_empty_batches_through_workers():
    loader = DPDataLoader(TensorDataset(torch.randn(4, 3)), sample_rate=1e-9, num_workers=2)
    (x,) = first_empty_batch(loader)
    assert x.shape == (0, 3)


def test_custom_collate_used_for_both_full_and_empty_batches():
    def to_dict(samples):
        return {"x": torch.stack([s[0] for s in samples]), "n": torch.tensor([len(samples)])}

    dataset = TensorDataset(torch.randn(10, 2))
    full = next(iter(DPDataLoader(dataset, sample_rate=1.0, collate_fn=to_dict)))
    assert full["x"].shape == (10, 2)
    empty = first_empty_batch(DPDataLoader(dataset, sample_rate=1e-9, collate_fn=to_dict))
    assert empty["x"].shape == (0, 2) and empty["n"].shape == (0,)


def test_unsupported_collate_output_fails_only_on_an_empty_batch():
    def with_metadata(samples):
        return {"x": torch.stack([s[0] for s in samples]), "source": "disk"}

    dataset = TensorDataset(torch.randn(10, 2))
    assert next(iter(DPDataLoader(dataset, sample_rate=1.0, collate_fn=with_metadata)))["source"] == "disk"
    with pytest.raises(TypeError, match=r"str at batch\['source'\]"):
        first_empty_batch(DPDataLoader(dataset, sample_rate=1e-9, collate_fn=with_metadata))


def test_from_data_loader_keeps_settings():
    def collate(samples):
        return torch.stack([s[0] for s in samples]) * 2

    def init_worker(worker_id):
        pass

    dataset = TensorDataset(torch.ones(100, 3))
    original = DataLoader(
        dataset, batch_size=10, shuffle=True, collate_fn=collate, num_workers=2, timeout=5.0,
        worker_init_fn=init_worker, prefetch_factor=3, persistent_workers=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shuffle=True is a default sampler: no warning
        loader = DPDataLoader.from_data_loader(original, generator=seeded())
    assert loader.sample_rate == 0.1 and len(loader) == 10 and loader.expected_batch_size == pytest.approx(10)
    assert loader.dataset is dataset and loader.collate_fn.collate_fn is collate
    assert (loader.num_workers, loader.timeout, loader.worker_init_fn) == (2, 5.0, init_worker)
    assert (loader.prefetch_factor, loader.persistent_workers) == (3, True)
    assert isinstance(loader.batch_sampler, UniformWithReplacementSampler)
    again = DPDataLoader.from_data_loader(loader)  # re-wrapping does not stack collate wrappers
    assert again.collate_fn.collate_fn is collate


def test_from_data_loader_warns_once_about_ignored_settings():
    dataset = TensorDataset(torch.zeros(100))
    original = DataLoader(dataset, batch_size=10, sampler=SubsetRandomSampler(range(50)), drop_last=True)
    with pytest.warns(UserWarning) as record:
        loader = DPDataLoader.from_data_loader(original)
    assert len(record) == 1
    assert "SubsetRandomSampler" in str(record[0].message) and "drop_last" in str(record[0].message)
    assert loader.sample_rate == 1 / 5  # the original loader's length
    with pytest.raises(ValueError, match="batch_size"):
        DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=None))
