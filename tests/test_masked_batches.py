"""Fixed-shape masked Poisson batches: padding, sampling unchanged, overflow, one DP step, sizing."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from scipy.stats import binom
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastdp import BatchMemoryManager, PrivacyEngine
from fastdp.data import DPDataLoader, suggested_padded_batch_size

from .models import clipped_sum, microbatch_per_sample_grads


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def numbered(n: int) -> TensorDataset:
    """Rows that are never zero and name their index, so padding and sampling are visible."""
    return TensorDataset(torch.arange(1, n + 1, dtype=torch.float64)[:, None].expand(n, 3).clone(), torch.arange(n))


def test_padded_batches_have_fixed_shape_and_the_same_samples():
    dataset, size = numbered(200), 25
    plain = DPDataLoader(dataset, sample_rate=0.05, generator=seeded(1))
    padded = DPDataLoader(dataset, sample_rate=0.05, generator=seeded(1), padded_batch_size=size)
    pairs = list(zip(itertools.chain(plain, plain), itertools.chain(padded, padded)))  # 40 steps
    assert len(pairs) == 40
    for (x, y), (px, py, mask) in pairs:
        assert px.shape == (size, 3) and px.dtype == torch.float64
        assert py.shape == (size,) and py.dtype == torch.int64
        assert mask.shape == (size,) and mask.dtype == torch.float32
        b = len(y)
        assert mask.sum().item() == b and mask[:b].eq(1).all() and mask[b:].eq(0).all()
        assert torch.equal(px[:b], x) and torch.equal(py[:b], y)  # same indices: padding leaves sampling alone
        assert px[b:].eq(0).all() and py[b:].eq(0).all()
    assert len({len(y) for (_, y), _ in pairs}) > 1  # batch sizes did vary


def test_empty_batch_is_all_padding():
    x, y, mask = next(iter(DPDataLoader(numbered(20), sample_rate=1e-9, padded_batch_size=4)))
    assert x.shape == (4, 3) and y.shape == (4,) and mask.tolist() == [0.0] * 4 and x.eq(0).all()


class DictDataset(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"image": torch.full((2,), i + 1.0), "label": i, "name": f"s{i}"}


def test_dict_batch_gets_a_mask_key_and_padded_lists():
    batch = next(iter(DPDataLoader(DictDataset(), sample_rate=0.5, generator=seeded(0), padded_batch_size=12)))
    b = int(batch["mask"].sum())
    assert batch["image"].shape == (12, 2) and batch["label"].shape == (12,) and len(batch["name"]) == 12
    assert batch["image"][b:].eq(0).all() and batch["name"][b:] == [None] * (12 - b)
    assert batch["image"][:b, 0].sub(1).long().tolist() == batch["label"][:b].tolist()


def test_bare_tensor_batch_becomes_batch_and_mask():
    class Plain(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.ones(3)

    x, mask = next(iter(DPDataLoader(Plain(), sample_rate=0.3, generator=seeded(0), padded_batch_size=8)))
    assert x.shape == (8, 3) and torch.equal(x[:, 0], mask)


def test_padding_refuses_collate_output_it_cannot_pad_or_mask():
    dataset = TensorDataset(torch.randn(10, 2))
    with pytest.raises(TypeError, match=r"str at batch\['source'\]"):  # at construction, not on some later batch
        DPDataLoader(dataset, sample_rate=0.5, padded_batch_size=8, collate_fn=lambda s: {"x": s[0][0], "source": "disk"})
    with pytest.raises(ValueError, match='"mask"'):
        DPDataLoader(dataset, sample_rate=0.5, padded_batch_size=8, collate_fn=lambda s: {"mask": s[0][0]})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_oversized_batch_is_yielded_whole_with_one_warning(num_workers):
    n, q, size = 50, 0.25, 14
    loader = DPDataLoader(numbered(n), sample_rate=q, generator=seeded(2), padded_batch_size=size, num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [batch for _ in range(3) for batch in loader]  # 12 steps
    sizes = [int(mask.sum()) for _, _, mask in batches]
    assert sum(b > size for b in sizes) >= 2 and any(b <= size for b in sizes)
    for (x, y, mask), b in zip(batches, sizes):
        assert len(x) == len(y) == len(mask) == max(b, size)
        if b > size:  # never truncated: every sampled row is real
            assert mask.eq(1).all() and x.ne(0).all()
    overflow = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(overflow) == 1
    message = str(overflow[0].message)
    assert f"{binom.sf(size, n, q):.3g}" in message and f"padded_batch_size={suggested_padded_batch_size(n, q)}" in message


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["bk", "hooks"])
@pytest.mark.parametrize("bound", [0.5, 2.0])  # per-sample norms are 1.1-3.2: 0.5 clips all, 2.0 only some (scale shows)
def test_masked_step_equals_clip_sum_divide_on_the_real_rows(reduction, mode, bound):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    reference, before = copy.deepcopy(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(torch.randn(64, 10), torch.randint(0, 3, (64,))), batch_size=16)
    size = 32
    module, dp_opt, dp_loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=bound, loss_reduction=reduction, grad_sample_mode=mode,
        padded_batch_size=size, noise_generator=seeded(3),
    )
    assert dp_loader.padded_batch_size == size
    x, y, mask = next(iter(dp_loader))
    assert x.shape == (size, 10) and 0 < mask.sum() < size
    loss = (F.cross_entropy(module(x), y, reduction="none") * mask).sum()
    (loss / size if reduction == "mean" else loss).backward()
    dp_opt.step()
    real = mask.bool()
    expected = clipped_sum(microbatch_per_sample_grads(reference, x[real], y[real]), bound)
    divisor = dp_opt.expected_batch_size if reduction == "mean" else 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - expected[n] / divisor, rtol=1e-4, atol=1e-6)  # norm bounds


def test_from_data_loader_keeps_the_padding():
    padded = DPDataLoader(numbered(20), sample_rate=0.25, padded_batch_size=9)
    assert DPDataLoader.from_data_loader(padded).padded_batch_size == 9
    assert DPDataLoader.from_data_loader(padded, padded_batch_size=11).padded_batch_size == 11


@pytest.mark.parametrize(
    "n, q, p", [(1000, 0.01, 1e-6), (60000, 256 / 60000, 1e-6), (50, 0.5, 0.1), (10, 1.0, 1e-6), (10**6, 1e-9, 1e-3)]
)
def test_suggested_padded_batch_size_is_the_smallest_safe_size(n, q, p):
    size = suggested_padded_batch_size(n, q, p)
    assert binom.sf(size, n, q) <= p
    assert size == 1 or binom.sf(size - 1, n, q) > p


@pytest.mark.parametrize("args", [(0, 0.1), (10, 0.0), (10, 1.5), (10, 0.1, 0.0), (10, 0.1, 1.0), (10.0, 0.1)])
def test_suggested_padded_batch_size_bad_arguments(args):
    with pytest.raises(ValueError, match="num_samples|sample_rate|overflow_probability"):
        suggested_padded_batch_size(*args)


@pytest.mark.parametrize("bad", [0, -3, 2.0, 1.5, "8", True])
def test_bad_padded_batch_size(bad):
    dataset = numbered(10)
    with pytest.raises(ValueError, match="padded_batch_size"):
        DPDataLoader(dataset, sample_rate=0.5, padded_batch_size=bad)
    with pytest.raises(ValueError, match="padded_batch_size"):
        DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=2), padded_batch_size=bad)
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="padded_batch_size"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(dataset, batch_size=2),
            noise_multiplier=1.0, max_grad_norm=1.0, padded_batch_size=bad,
        )


def test_padded_batches_refuse_batch_memory_manager_and_fixed_batches():
    data = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    model = nn.Linear(3, 2)
    engine = PrivacyEngine(accountant="rdp")
    _, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0, padded_batch_size=12,
    )
    with pytest.raises(ValueError, match="BatchMemoryManager"):
        BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=4, optimizer=dp_opt)
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        engine.make_private(
            module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=8),
            noise_multiplier=1.0, max_grad_norm=1.0, padded_batch_size=12, poisson_sampling=False,
        )
