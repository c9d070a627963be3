"""DPOptimizer as Opacus documents it: hand-wired use, its overridable stages, summed_grad, zero_grad rules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdp import GradSampleModule, PrivacyEngine
from fastdp.accountants import RDPAccountant
from fastdp.optimizers import DPOptimizer
from fastdp.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from .models import clipped_sum, microbatch_per_sample_grads

B, C = 8, 0.5


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(B, 6) * 3, torch.randint(0, 3, (B,))
    return model, x, y


def _expected_grads(model, x, y, bound=C, divisor=B):
    per_sample = microbatch_per_sample_grads(model, x, y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample.values()))
    assert (norms > bound).any(), "the test needs clipped samples"
    return {n: g / divisor for n, g in clipped_sum(per_sample, bound).items()}


@pytest.mark.parametrize("mode", ["bk", "hooks", "functorch"])
@pytest.mark.parametrize("order", ["module_first", "optimizer_first"])
def test_hand_wired_module_and_optimizer_clip_like_microbatching(mode, order):
    """Opacus's "under the hood" wiring: no make_private, no attach(); the applied gradient must be the
    clipped mean, not noise alone (it was 0 + noise before)."""
    model, x, y = _model_and_batch()
    expected = _expected_grads(model, x, y)
    if order == "module_first":
        module = GradSampleModule(model, mode=mode)
        optimizer = DPOptimizer(
            torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B
        )
    else:  # the optimizer exists first; the module's first backward waits for a policy until step()
        optimizer = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B
        )
        module = GradSampleModule(model, mode=mode)
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.25))
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
    assert accountant.history == [(0.0, 0.25, 1)]


def test_plain_model_with_dp_optimizer_is_refused():
    """Without a GradSampleModule p.grad is the non-private gradient: noising it would not be DP."""
    model, x, y = _model_and_batch()
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=B
    )
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="non-private"):
        optimizer.step()


def test_optimizer_side_clipping_of_grad_samples_set_by_hand():
    """Parameters with p.grad_sample and no attached module are clipped by the optimizer (Opacus's path)."""
    model, x, y = _model_and_batch()
    per_sample = microbatch_per_sample_grads(model, x, y)
    expected = {n: g / B for n, g in clipped_sum(per_sample, C).items()}
    optimizer = DPOptimizer(  # no module attached: p.summed_grad is kept by default, as in Opacus's no_op mode
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=B,
    )
    for name, p in model.named_parameters():
        p.grad_sample = per_sample[name]
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.summed_grad, expected[name] * B, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="zero_grad"):  # the same per-sample gradients may not be used twice
        optimizer.step()


class LaplaceDPOptimizer(DPOptimizer):
    """The subclass of Opacus's "under the hood" tutorial: Laplace instead of Gaussian noise."""

    def add_noise(self):
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = torch.distributions.Laplace(0.0, self.noise_multiplier * self.max_grad_norm).sample(p.summed_grad.shape)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def test_laplace_subclass_overrides_the_noise_stage():
    torch.manual_seed(0)
    model = nn.Linear(200, 100)  # 20 100 noise draws: the shape of the distribution shows
    module = GradSampleModule(model)
    optimizer = LaplaceDPOptimizer(
        torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=1.0, expected_batch_size=4
    )
    x = torch.randn(4, 200)
    (module(x) * 0).sum().backward()  # zero gradients: p.grad is the noise alone, scaled
    optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * 4  # undo the mean's 1/4
    centred = noise - noise.mean()
    variance = centred.square().mean()
    excess_kurtosis = centred.pow(4).mean() / variance**2 - 3
    assert abs(variance.item() / (2 * 2.0**2) - 1) < 0.05  # Laplace(b = σC = 2): variance 2b²
    assert excess_kurtosis > 2  # Laplace: 3; Gaussian (the fused default path): 0
    for p in model.parameters():  # the clipped sum the noise went onto, marked as used
        assert torch.equal(p.summed_grad, torch.zeros_like(p)) and hasattr(p.summed_grad, "_processed")


def _private_sgd(model, x, y, **kwargs):
    """make_private with SGD, σ = 1, C, the batch (x, y) as one fixed batch: (module, optimizer)."""
    module, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B),
        noise_multiplier=1.0, max_grad_norm=C, poisson_sampling=False, **kwargs,
    )
    return module, optimizer


def test_summed_grad_holds_the_clipped_sum_until_the_noise_goes_into_its_buffer():
    """By default the noise goes into the gradient buffer in place: p.summed_grad is the clipped sum (a view of
    the buffer) from clip_and_accumulate until the noise pass, then None, never the noised values."""
    model, x, y = _model_and_batch()
    expected = _expected_grads(model, x, y, divisor=1)
    module, optimizer = _private_sgd(model, x, y)
    F.cross_entropy(module(x), y).backward()
    optimizer.clip_and_accumulate()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.summed_grad, expected[name], rtol=1e-4, atol=1e-6)
    optimizer.zero_grad()  # a fresh start: the step below clips the same batch again
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    assert all(p.summed_grad is None and p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "options, kept",
    [
        ({}, False),  # bk mode: the noise goes into the clipped sum's storage (no second buffer)
        ({"grad_sample_mode": "hooks"}, True),  # the Opacus modes, whose p.grad_sample already costs B gradients
        ({"grad_sample_mode": "functorch"}, True),
        ({"keep_summed_grad": True}, True),
        ({"grad_sample_mode": "hooks", "keep_summed_grad": False}, False),
    ],
    ids=["bk", "hooks", "functorch", "bk-keep", "hooks-keep-false"],
)
def test_summed_grad_outlives_the_step_where_per_sample_gradients_are_materialised_or_asked(options, kept):
    """keep_summed_grad=None (default): Opacus's p.summed_grad after step() in "hooks"/"functorch" mode, not in
    "bk" mode; True/False decide either way. Kept, it is the clipped sum in a buffer of its own until zero_grad."""
    model, x, y = _model_and_batch()
    expected = _expected_grads(model, x, y, divisor=1)
    module, optimizer = _private_sgd(model, x, y, **options)
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if kept:
            torch.testing.assert_close(p.summed_grad, expected[name], rtol=1e-4, atol=1e-6)
            assert p.summed_grad.untyped_storage().data_ptr() != p.grad.untyped_storage().data_ptr()
        else:
            assert p.summed_grad is None and p.grad is not None
    optimizer.zero_grad()
    assert all(p.summed_grad is None and p.grad is None for p in model.parameters())


def test_step_twice_without_zero_grad_is_an_error():
    model, x, y = _model_and_batch()
    module = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=B
    )
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    F.cross_entropy(module(x), y).backward()  # would add onto the released (noised) gradient
    with pytest.raises(ValueError, match="zero_grad"):
        optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(module(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_accumulation_without_poisson_sampling_counts_every_backward(mode):
    """Opacus semantics: k backward passes before one step are k batches of distinct samples; the mean
    divides by k·expected_batch_size and the accountant counts k·q."""
    model, x, y = _model_and_batch()
    x2, y2 = torch.randn(B, 6) * 3, torch.randint(0, 3, (B,))
    per_sample = microbatch_per_sample_grads(model, torch.cat([x, x2]), torch.cat([y, y2]))
    expected = {n: g / (2 * B) for n, g in clipped_sum(per_sample, C).items()}
    engine = PrivacyEngine(accountant="rdp")
    data = torch.utils.data.TensorDataset(torch.cat([x, x2]), torch.cat([y, y2]))
    module, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(data, batch_size=B), noise_multiplier=0.0, max_grad_norm=C,
        poisson_sampling=False, grad_sample_mode=mode,
    )
    F.cross_entropy(module(x), y).backward()
    F.cross_entropy(module(x2), y2).backward()
    assert optimizer.accumulated_iterations == 2
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
    assert engine.accountant.history == [(0.0, 1.0, 1)]  # q = 1/2 per batch, two batches


def test_accumulation_under_poisson_sampling_is_an_error():
    model, x, y = _model_and_batch()
    module, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=C,
    )
    F.cross_entropy(module(x), y).backward()
    with pytest.raises(ValueError, match="Poisson"):  # raised by the second batch's forward
        F.cross_entropy(module(x), y).backward()
    optimizer.step()  # the first batch alone is a normal step
    optimizer.zero_grad()
    F.cross_entropy(module(x), y).backward()


def test_hand_wired_per_layer_clipping():
    model, x, y = _model_and_batch()
    bounds = [0.3, 0.2, 0.4, 0.1]
    per_sample = microbatch_per_sample_grads(model, x, y)
    module = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=bounds,
        expected_batch_size=B, clipping="per_layer",
    )
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    for (name, p), bound in zip(model.named_parameters(), bounds):
        g = per_sample[name]
        factors = (bound / (g.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", factors, g) / B, rtol=1e-4, atol=1e-6)


def test_wrapping_a_dp_optimizer_again_is_refused():
    model, _, _ = _model_and_batch()
    inner = DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=B)
    with pytest.raises(ValueError, match="already a DPOptimizer"):
        DPOptimizer(inner, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)


def test_a_forward_with_grad_after_the_step_is_not_a_second_batch():
    """Under Poisson sampling a second batch before step() is refused at its forward; after step() the
    backward was consumed, so e.g. an accuracy forward (with grad) before zero_grad() is fine."""
    model, x, y = _model_and_batch()
    module, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=C,
    )
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    module(x).argmax(1)  # not refused
    optimizer.zero_grad()
