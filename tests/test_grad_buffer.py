"""The persistent gradient buffer (issue 15): gradients allocated once, clipped sums and noise in place."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from fastdp import GradSampleModule, PrivacyEngine
from fastdp.optimizers.grad_buffer import GradBuffer, segment_numel
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
    assert peak <= NOISE_CHUNK_NUMEL * 4 + 4096, (peak, gradient_bytes)  # one chunk of noise alive at a time


def _segment_storages(optimizer) -> set:
    return {segment.flat.untyped_storage().data_ptr() for segment in optimizer.grad_buffer.segments}


def test_gradients_are_views_of_the_segments_kept_with_set_to_none_false():
    model, (x, y) = _wide_model_and_batch()
    module, optimizer, _ = _private(model, (x, y))
    addresses = []
    for _ in range(3):
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert storages == _segment_storages(optimizer)  # every p.grad is a view of a segment
        addresses.append(storages)
        optimizer.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert all(a == addresses[0] for a in addresses)  # the same storage every step: allocated once, zeroed in place


def test_segments_hold_consecutive_parameters_up_to_the_bound():
    """Optimizer order, one device and dtype each, at most segment_numel elements unless one parameter alone."""
    model = nn.Sequential(nn.Linear(300, 400), nn.Linear(400, 30), nn.Linear(30, 2)).double()
    model.append(nn.Linear(2, 2))  # float32 after float64 parameters: a segment of its own dtype
    params = list(model.parameters())
    totals = {dtype: sum(p.numel() for p in params if p.dtype == dtype) for dtype in (torch.float64, torch.float32)}
    buffer = GradBuffer(params)
    assert [p for segment in buffer.segments for p in segment.params] == params
    for segment in buffer.segments:
        assert {p.dtype for p in segment.params} == {segment.dtype}
        assert segment.numel <= segment_numel(totals[segment.dtype]) or len(segment.params) == 1
    assert [len(segment.params) for segment in buffer.segments] == [1, 5, 2]  # 120,000 alone; then under 2^16


def test_zero_grad_with_set_to_none_releases_the_buffer():
    """torch's default: gradients are released between steps (the next backward allocates the segments again,
    zeroed), so they do not sit beside the next forward's activations."""
    model, (x, y) = _wide_model_and_batch()
    module, optimizer, _ = _private(model, (x, y))
    for _ in range(2):
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        assert all(segment.flat is None for segment in optimizer.grad_buffer.segments)
    F.cross_entropy(module(x), y).backward()
    assert {p.grad.untyped_storage().data_ptr() for p in model.parameters()} == _segment_storages(optimizer)


def _backward_peak(module, x, y) -> int:
    return _peak_allocated(lambda: F.cross_entropy(module(x), y).backward())


def test_per_layer_clipping_backward_allocates_gradients_as_it_goes():
    """Under per-layer clipping a segment is allocated when its first clipped sum is written, so the backward's
    peak is non-private's (whose gradients also appear layer by layer) plus at most one segment, not the
    whole buffer beside every activation."""
    torch.manual_seed(0)
    widths = [256] * 8 + [4]  # activations (batch 1024) well above the gradients: their order matters
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    x, y = torch.randn(1024, 256), torch.randint(0, 4, (1024,))
    plain = nn.Sequential(*[m for m in copy.deepcopy(model)])
    non_private = max(_backward_peak(plain, x, y) for _ in range(2))
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])
    module, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=[1.0] * len(list(model.parameters())), clipping="per_layer",
        poisson_sampling=False,
    )
    largest_segment = max(segment.numel for segment in optimizer.grad_buffer.segments) * 4
    assert largest_segment < gradient_bytes / 4
    activation_bytes = x.numel() * 4 * 2 * (len(widths) - 2)
    assert activation_bytes > 4 * gradient_bytes
    for _ in range(2):
        private = _backward_peak(module, x, y)
        optimizer.step()
        optimizer.zero_grad()
        assert private <= non_private + largest_segment + gradient_bytes // 20, (private, non_private, gradient_bytes)


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
        assert {p.grad.untyped_storage().data_ptr() for p in model.parameters()} == _segment_storages(optimizer)
        summed = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for p, s in zip(model.parameters(), summed):
            torch.testing.assert_close(p.grad, s / x.shape[0])
