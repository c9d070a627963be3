"""BatchMemoryManager: leaving it mid logical batch leaves nothing behind; len() without Poisson sampling."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp import BatchMemoryManager, PrivacyEngine

N, BATCH, PHYSICAL = 48, 12, 5


def _private(seed=0, accountant="rdp"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(N, 6) * 3, torch.randint(0, 3, (N,)))
    engine = PrivacyEngine(accountant=accountant)
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=DataLoader(data, batch_size=BATCH),
        noise_multiplier=0.0, max_grad_norm=0.5, poisson_sampling=False,
    )
    return engine, module, optimizer, loader


def _real_step(module, optimizer, x, y):
    """One ordinary step outside any BatchMemoryManager; returns the released gradient."""
    optimizer.zero_grad()
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    return [p.grad.clone() for p in optimizer.params]


def _clean_gradient(x, y):
    _, module, optimizer, _ = _private()
    return _real_step(module, optimizer, x, y)


def _interrupt(how, module, optimizer, loader):
    """Enter a BatchMemoryManager, run one virtual (physical) step of the first logical batch, leave."""
    with pytest.raises(RuntimeError) if how == "exception" else _nothing():
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=PHYSICAL, optimizer=optimizer) as chunks:
            for x, y in chunks:
                optimizer.zero_grad()
                F.cross_entropy(module(x), y).backward()
                optimizer.step()  # virtual: the logical batch has 12 samples, this chunk 5
                if how == "exception":
                    raise RuntimeError("out of memory, say")
                break
            if how == "break_then_zero_grad":
                optimizer.zero_grad()  # outside a virtual batch now: must clear everything


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("how", ["break", "break_then_zero_grad", "exception"])
def test_leaving_mid_logical_batch_releases_nothing_of_it(how):
    """Leave-one-out: after an interrupted BatchMemoryManager loop, the next real step's gradient is a
    clean step's (σ = 0), and the accountant counted only real steps. Before, the partial clipped sum
    stayed in p.grad and was released with the next batch, uncounted."""
    x, y = torch.randn(BATCH, 6) * 3, torch.randint(0, 3, (BATCH,))
    clean = _clean_gradient(x, y)
    engine, module, optimizer, loader = _private()
    _interrupt(how, module, optimizer, loader)
    assert engine.accountant.history == []
    assert all(getattr(p, "summed_grad", None) is None and p.grad is None for p in optimizer.params)
    after = _real_step(module, optimizer, x, y)
    for got, want in zip(after, clean):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert engine.accountant.history == [(0.0, BATCH / N, 1)]


def test_zero_grad_inside_the_loop_keeps_accumulating():
    """The usual zero_grad(); backward(); step() per physical chunk still sums a whole logical batch."""
    engine, module, optimizer, loader = _private()
    x_all, y_all = loader.dataset.tensors
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=PHYSICAL, optimizer=optimizer) as chunks:
        sizes = []
        for x, y in chunks:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y, reduction="mean").backward()
            optimizer.step()
            sizes.append(len(x))
            if sum(sizes) == BATCH:
                released = [p.grad.clone() for p in optimizer.params]
                break
    assert sizes == [5, 5, 2]
    clean = _clean_gradient(x_all[:BATCH], y_all[:BATCH])
    for got, want in zip(released, clean):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert engine.accountant.history == [(0.0, BATCH / N, 1)]


@pytest.mark.parametrize("batch_size, physical, drop_last", [(12, 5, False), (10, 4, False), (10, 4, True), (8, 8, False)])
def test_len_without_poisson_sampling_is_the_number_of_chunks(batch_size, physical, drop_last):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(N, 3), torch.randint(0, 2, (N,)))
    _, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=batch_size, drop_last=drop_last),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer) as chunks:
        assert len(chunks) == sum(1 for _ in chunks)

