"""PrivacyEngine + DPOptimizer end to end: one step against microbatching, noise, accounting, errors."""

import copy
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastdp import BatchMemoryManager, PrivacyEngine, register_grad_sampler
from fastdp.accountants import RDPAccountant

from .models import Scale, clipped_sum, microbatch_per_sample_grads

N, BATCH = 64, 16


def _setup(seed=0, model=None, batch_size=BATCH, lr=1.0):
    torch.manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(N, 6), torch.randint(0, 3, (N,)))
    loader = DataLoader(data, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return model, optimizer, loader


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_with_zero_noise_is_clip_sum_divide(reduction):
    model, optimizer, loader = _setup()
    reference = copy.deepcopy(model)
    before = _params(model)
    engine = PrivacyEngine(accountant="rdp")
    module, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.5,
        loss_reduction=reduction, noise_generator=torch.Generator().manual_seed(3),
    )
    x, y = next(iter(dp_loader))
    assert 0 < len(x) < N
    per_sample = microbatch_per_sample_grads(reference, x, y)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample.values()))
    assert (norms < 1.5).any() and (norms > 1.5).any()  # clipped and unclipped samples: a wrong scale shows
    F.cross_entropy(module(x), y, reduction=reduction).backward()
    dp_opt.step()
    expected = clipped_sum(per_sample, 1.5)
    divisor = dp_opt.expected_batch_size if reduction == "mean" else 1
    for n, p in model.named_parameters():  # rtol: the engine clips with upper bounds of the norms
        torch.testing.assert_close(p.detach(), before[n] - expected[n] / divisor, rtol=1e-4, atol=1e-6)


def test_huge_bound_and_no_noise_is_non_private_sgd():
    model, optimizer, loader = _setup()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1.0)
    module, dp_opt, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e9,
        poisson_sampling=False,
    )
    for x, y in dp_loader:
        F.cross_entropy(module(x), y).backward()
        dp_opt.step()
        dp_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_noise_std_is_sigma_c_over_expected_batch():
    torch.manual_seed(0)
    model = nn.Linear(50, 20, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(N, 50), torch.zeros(N, dtype=torch.long)), batch_size=BATCH)
    sigma, c = 1.7, 0.8
    module, dp_opt, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=c,
        noise_generator=torch.Generator().manual_seed(1),
    )
    draws = []
    for _ in range(50):
        x, y = next(iter(dp_loader))
        F.cross_entropy(module(x), y).backward()  # zero inputs: clipped sum is 0, only noise remains
        dp_opt.step()
        draws.append(model.weight.grad.flatten().clone())
        dp_opt.zero_grad()
    draws = torch.cat(draws)  # 50 000 values
    expected = sigma * c / dp_opt.expected_batch_size
    assert draws.mean().abs() < 4 * expected / math.sqrt(draws.numel())
    assert draws.std().item() == pytest.approx(expected, rel=0.02)  # a per-rank or doubled draw fails


def test_accountant_records_every_step_and_epsilon():
    model, optimizer, loader = _setup()
    engine = PrivacyEngine(accountant="rdp")
    module, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.1, max_grad_norm=1.0
    )
    steps = 0
    for x, y in dp_loader:
        F.cross_entropy(module(x), y).backward()
        dp_opt.step()
        dp_opt.zero_grad()
        steps += 1
    assert engine.accountant.history == [(1.1, 1 / len(loader), steps)]
    reference = RDPAccountant()
    reference.history = [(1.1, BATCH / N, steps)]
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5))


def test_empty_batch_step_adds_noise_and_counts():
    model, optimizer, loader = _setup()
    engine = PrivacyEngine(accountant="rdp")
    module, dp_opt, _ = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    x, y = torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)
    F.cross_entropy(module(x), y, reduction="sum").backward()
    dp_opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert engine.accountant.history[0][2] == 1


def test_batch_memory_manager_equals_one_big_batch():
    """Physical chunks of each Poisson batch give the same update as the whole batch at once."""

    def run(physical):
        model, optimizer, loader = _setup(batch_size=32)
        engine = PrivacyEngine(accountant="rdp")
        module, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.3,
            noise_generator=torch.Generator().manual_seed(5), loss_reduction="sum",
        )
        if physical is None:
            batches = dp_loader
        else:
            manager = BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical, optimizer=dp_opt)
            batches = manager.__enter__()
        sizes = []
        for x, y in batches:
            sizes.append(len(x))
            F.cross_entropy(module(x), y, reduction="sum").backward()
            dp_opt.step()
            dp_opt.zero_grad()
        return model, sizes, engine.accountant.history

    whole, whole_sizes, whole_history = run(None)
    split, split_sizes, split_history = run(5)
    assert max(split_sizes) <= 5 < max(whole_sizes)
    assert sum(split_sizes) == sum(whole_sizes)
    assert split_history == whole_history  # one accountant step per logical batch
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_two_backward_passes_per_step_is_an_error():
    model, optimizer, loader = _setup()
    module, dp_opt, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    batches = iter(dp_loader)
    x, y = next(batches)
    F.cross_entropy(module(x), y).backward()
    x, y = next(batches)
    with pytest.raises(ValueError, match="BatchMemoryManager"):  # the second batch's forward (Opacus: its backward)
        F.cross_entropy(module(x), y).backward()
    with pytest.raises(ValueError, match="BatchMemoryManager"):  # and the step, if the check was bypassed
        module.allow_grad_accumulation()
        F.cross_entropy(module(x), y).backward()
        module.forbid_grad_accumulation()
        dp_opt.step()


def test_checkpoint_round_trip(tmp_path):
    model, optimizer, loader = _setup()
    engine = PrivacyEngine(accountant="prv")
    module, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    for x, y in dp_loader:
        F.cross_entropy(module(x), y).backward()
        dp_opt.step()
        dp_opt.zero_grad()
    engine.save_checkpoint(path=tmp_path / "ckpt.pt", module=module, optimizer=dp_opt, checkpoint_dict={"epoch": 3})
    model2, optimizer2, loader2 = _setup(seed=9)
    engine2 = PrivacyEngine(accountant="prv")
    module2, dp_opt2, _ = engine2.make_private(
        module=model2, optimizer=optimizer2, data_loader=loader2, noise_multiplier=1.0, max_grad_norm=1.0
    )
    extra = engine2.load_checkpoint(path=tmp_path / "ckpt.pt", module=module2, optimizer=dp_opt2)
    assert extra == {"epoch": 3}
    assert engine2.accountant.history == engine.accountant.history
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_make_private_with_epsilon_meets_the_target():
    model, optimizer, loader = _setup()
    engine = PrivacyEngine(accountant="rdp")
    module, dp_opt, dp_loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=2.0, target_delta=1e-5,
        epochs=3, max_grad_norm=1.0,
    )
    for _ in range(3):
        for x, y in dp_loader:
            F.cross_entropy(module(x), y).backward()
            dp_opt.step()
            dp_opt.zero_grad()
    assert 1.9 <= engine.get_epsilon(1e-5) <= 2.0


def test_opacus_ghost_mode_returns_a_criterion():
    model, optimizer, loader = _setup()
    module, dp_opt, criterion, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(),
    )
    x, y = next(iter(dp_loader))
    criterion(module(x), y).backward()
    dp_opt.step()
    assert module.mode == "bk"


def test_adaptive_clipping_tracks_the_quantile_and_pays_for_it():
    model, optimizer, loader = _setup()
    module, dp_opt, dp_loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=100.0,
        clipping="adaptive", target_unclipped_quantile=0.5, clipbound_learning_rate=0.5, unclipped_num_std=2.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert dp_opt.gradient_noise_multiplier == pytest.approx((1.0 - (2 * 2.0) ** -2) ** -0.5)
    for _ in range(20):
        for x, y in dp_loader:
            F.cross_entropy(module(x), y).backward()
            dp_opt.step()
            dp_opt.zero_grad()
    assert dp_opt.max_grad_norm < 10.0  # everything was unclipped at C = 100: the bound came down


def test_user_registered_grad_sampler_is_used(monkeypatch):
    from fastdp.engine import rules

    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))  # the registration ends with this test
    calls = []

    @register_grad_sampler(Scale)
    def scale_grad_sample(layer, activations, backprops):
        calls.append(1)
        x = activations[0]
        return {layer.gain: (x * backprops) + 2 * layer.gain * backprops.sum(-1, keepdim=True)}

    model = nn.Sequential(nn.Linear(6, 4), Scale(4), nn.Linear(4, 3))
    reference = copy.deepcopy(model)
    model, optimizer, loader = _setup(model=model)
    module, dp_opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.1,
        loss_reduction="sum",
    )
    x, y = next(iter(loader))
    F.cross_entropy(module(x), y, reduction="sum").backward()
    expected = clipped_sum(microbatch_per_sample_grads(reference, x, y), 0.1)
    assert calls
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)


def test_bad_input_errors():
    model, optimizer, loader = _setup()
    engine = PrivacyEngine()
    base = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        engine.make_private(**{**base, "max_grad_norm": 0})
    with pytest.raises(ValueError, match="loss_reduction"):
        engine.make_private(**{**base, "loss_reduction": "none"})
    with pytest.raises(ValueError, match="not in module"):
        engine.make_private(**{**base, "optimizer": torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)})
    with pytest.raises(ValueError, match="noise_multiplier"):
        engine.make_private(**{**base, "noise_multiplier": -1.0})
    with pytest.raises(ValueError, match="ModuleValidator.fix"):
        bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
        engine.make_private(**{**base, "module": bn, "optimizer": torch.optim.SGD(bn.parameters(), lr=0.1)})
    with pytest.raises(ValueError, match="clipping"):
        engine.make_private(**{**base, "clipping": "elementwise"})


def test_per_layer_clipping_clips_each_parameter_to_its_bound():
    model, optimizer, loader = _setup()
    reference = copy.deepcopy(model)
    before = _params(model)
    names = [n for n, _ in model.named_parameters()]
    bounds = [0.05 * (k + 1) for k in range(len(names))]
    module, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=bounds,
        clipping="per_layer", loss_reduction="sum",
    )
    assert dp_opt.max_grad_norm == pytest.approx(math.sqrt(sum(b * b for b in bounds)))  # sets the noise
    x, y = next(iter(loader))
    F.cross_entropy(module(x), y, reduction="sum").backward()
    dp_opt.step()
    grads = microbatch_per_sample_grads(reference, x, y)
    for name, bound in zip(names, bounds):
        expected = clipped_sum({name: grads[name]}, bound)[name]  # each parameter alone
        torch.testing.assert_close(model.get_parameter(name).detach(), before[name] - expected, rtol=1e-5, atol=1e-6)


def test_per_layer_needs_one_bound_per_parameter():
    model, optimizer, loader = _setup()
    with pytest.raises(ValueError, match="one bound per trainable"):
        PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            clipping="per_layer",
        )
