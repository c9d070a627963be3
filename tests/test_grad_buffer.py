"""The persistent gradient buffer (issue 15): gradients allocated once, clipped sums and noise in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fastdp import GradSampleModule, PrivacyEngine
from fastdp.ops.noise import NOISE_CHUNK_NUMEL, add_noise_and_scale, noise_chunks


def _peak_allocated(fn) -> int:
    """Peak of live CPU tensor bytes allocated while ``fn`` runs, above those live before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _private(model, batch, **kwargs):
    x, y = batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])
    return PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, **kwargs,
    )


def _wide_model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 4))
    return model, (torch.randn(16, 512), torch.randint(0, 4, (16,)))


def test_the_step_allocates_no_gradient_sized_temporary():
    """Noise and scaling run in place over the buffer a chunk at a time: the step's peak is a chunk of noise,
    not a concatenated copy of the gradients plus a full-size noise draw (3x the gradients before)."""
    model, (x, y) = _wide_model_and_batch()
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert gradient_bytes > 4 * NOISE_CHUNK_NUMEL * 4
    module, optimizer, _ = _private(model, (x, y))
    for _ in range(2):  # the second step runs on the buffer the first allocated
        F.cross_entropy(module(x), y).backward()
        peak = _peak_allocated(optimizer.step)
        optimizer.zero_grad()
    assert peak <= 2 * NOISE_CHUNK_NUMEL * 4, (peak, gradient_bytes)


def test_gradients_are_views_of_one_buffer_kept_with_set_to_none_false():
    model, (x, y) = _wide_model_and_batch()
    module, optimizer, _ = _private(model, (x, y))
    addresses = []
    for _ in range(3):
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) == 1  # every p.grad is a view of one flat tensor
        addresses.append(storages.pop())
        optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert len(set(addresses)) == 1  # the same storage every step: allocated once, zeroed in place


def test_zero_grad_with_set_to_none_releases_the_buffer():
    """torch's default: gradients are released between steps (the next backward allocates the buffer again,
    zeroed), so they do not sit beside the next forward's activations."""
    model, (x, y) = _wide_model_and_batch()
    module, optimizer, _ = _private(model, (x, y))
    for _ in range(2):
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        assert all(group.flat is None for group in optimizer.grad_buffer.groups)
    F.cross_entropy(module(x), y).backward()
    assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def test_zero_grad_clears_the_buffer_in_place():
    """zero_grad(set_to_none=False) leaves zeros in the same tensors; an abandoned backward leaves nothing."""
    model, (x, y) = _wide_model_and_batch()
    module, optimizer, _ = _private(model, (x, y))
    F.cross_entropy(module(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert any(g.abs().sum() > 0 for g in grads)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))


def test_chunked_noise_equals_one_full_size_draw_on_cpu():
    """The chunks are drawn in order from one generator: the same numbers as one torch.randn of the whole."""
    n = 3 * NOISE_CHUNK_NUMEL + 37  # a ragged tail (joins the chunk before it when under 16)
    flat = torch.randn(n, generator=torch.Generator().manual_seed(1))
    expected = (flat + 0.5 * torch.randn(n, generator=torch.Generator().manual_seed(2))) * 0.25
    add_noise_and_scale(flat, 0.5, 0.25, torch.Generator().manual_seed(2))
    torch.testing.assert_close(flat, expected, rtol=0, atol=1e-6)
    sizes = [c.numel() for c in noise_chunks(torch.empty(n))]
    assert sum(sizes) == n and max(sizes) <= NOISE_CHUNK_NUMEL + 16


def test_clipped_sums_go_into_the_buffer_that_the_step_releases():
    """The engine adds each layer's clipped sum into the parameter's view of the buffer; noise-free, the
    released gradient is that sum over the batch size (flat and per-layer clipping alike)."""
    for clipping in ("flat", "per_layer"):
        model, (x, y) = _wide_model_and_batch()
        reference = GradSampleModule(nn.Sequential(*[m for m in _wide_model_and_batch()[0]]))
        reference.load_state_dict({f"_module.{k}": v for k, v in model.state_dict().items()})
        max_grad_norm = 1.0 if clipping == "flat" else [1.0] * len(list(model.parameters()))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])
        module, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            noise_multiplier=0.0, max_grad_norm=max_grad_norm, clipping=clipping, poisson_sampling=False,
        )
        F.cross_entropy(module(x), y).backward()
        buffer = optimizer.grad_buffer.groups[0].flat
        assert all(p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in model.parameters())
        summed = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for p, s in zip(model.parameters(), summed):
            torch.testing.assert_close(p.grad, s / x.shape[0])
