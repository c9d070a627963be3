"""Noise and clipping-bound schedulers: their schedules, the accountant following σ, checkpoints."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp import PrivacyEngine
from fastdp.schedulers import ExponentialGradClip, ExponentialNoise, LambdaGradClip, LambdaNoise, StepGradClip, StepNoise


def _private(sigma=1.0, seed=0, accountant="rdp"):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    engine = PrivacyEngine(accountant=accountant)
    module, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=10),
        noise_multiplier=sigma, max_grad_norm=1.0, poisson_sampling=False,
    )
    return engine, module, optimizer, loader


@pytest.mark.parametrize("make, expected", [
    (lambda o: ExponentialNoise(o, gamma=0.5), [1.0, 0.5, 0.25, 0.125]),
    (lambda o: StepNoise(o, step_size=2, gamma=0.5), [1.0, 1.0, 0.5, 0.5]),
    (lambda o: LambdaNoise(o, noise_lambda=lambda epoch: 1 + epoch), [1.0, 2.0, 3.0, 4.0]),
])
def test_noise_schedules(make, expected):
    _, _, optimizer, _ = _private()
    scheduler = make(optimizer)
    seen = [optimizer.noise_multiplier]
    for _ in range(3):
        scheduler.step()
        seen.append(optimizer.noise_multiplier)
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize("make, expected", [
    (lambda o: ExponentialGradClip(o, gamma=0.5), [1.0, 0.5, 0.25]),
    (lambda o: StepGradClip(o, step_size=2, gamma=0.1), [1.0, 1.0, 0.1]),
    (lambda o: LambdaGradClip(o, scheduler_function=lambda epoch: 1 - epoch / 4), [1.0, 0.75, 0.5]),
])
def test_clipping_bound_schedules(make, expected):
    _, _, optimizer, _ = _private()
    scheduler = make(optimizer)
    seen = [optimizer.max_grad_norm]
    for _ in range(2):
        scheduler.step()
        seen.append(optimizer.max_grad_norm)
    assert seen == pytest.approx(expected)


def test_the_accountant_follows_the_scheduled_noise():
    engine, module, optimizer, loader = _private(sigma=2.0)
    scheduler = ExponentialNoise(optimizer, gamma=0.5)
    for epoch in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
        scheduler.step()
    assert engine.accountant.history == [(2.0, 0.25, 4), (1.0, 0.25, 4)]


def test_a_negative_scheduled_noise_is_refused():
    _, _, optimizer, _ = _private()
    scheduler = LambdaNoise(optimizer, noise_lambda=lambda epoch: 1 - epoch)
    scheduler.step()
    with pytest.raises(ValueError, match="noise_multiplier"):
        scheduler.step()


def test_schedulers_need_a_dp_optimizer():
    with pytest.raises(ValueError, match="DPOptimizer"):
        StepNoise(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), step_size=1, gamma=0.5)


def test_checkpoint_round_trip_with_schedulers():
    engine1, module1, optimizer1, loader1 = _private(sigma=1.0, seed=1)
    noise1, clip1 = StepNoise(optimizer1, step_size=1, gamma=0.5), StepGradClip(optimizer1, step_size=1, gamma=0.9)
    for x, y in loader1:
        optimizer1.zero_grad()
        F.cross_entropy(module1(x), y).backward()
        optimizer1.step()
    noise1.step(), clip1.step()
    engine2, module2, optimizer2, _ = _private(sigma=3.0, seed=2)
    noise2, clip2 = StepNoise(optimizer2, step_size=3, gamma=2.0), StepGradClip(optimizer2, step_size=3, gamma=2.0)
    buffer = io.BytesIO()
    engine1.save_checkpoint(path=buffer, module=module1, optimizer=optimizer1, noise_scheduler=noise1,
                            grad_clip_scheduler=clip1, checkpoint_dict={"epoch": 1})
    buffer.seek(0)
    extra = engine2.load_checkpoint(path=buffer, module=module2, optimizer=optimizer2, noise_scheduler=noise2,
                                    grad_clip_scheduler=clip2)
    assert extra == {"epoch": 1}
    assert noise2.state_dict() == noise1.state_dict() and clip2.state_dict() == clip1.state_dict()
    assert engine2.accountant.history == engine1.accountant.history
    noise1.step(), noise2.step()  # the restored schedule continues where the saved one was
    assert optimizer2.noise_multiplier == pytest.approx(3.0 * 0.5)  # σ itself is the optimizer's, not saved
    for p, q in zip(module1.parameters(), module2.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_loads_into_the_plain_model():
    """The saved model state has the unwrapped keys (no "_module." prefix): a plain model loads it."""
    engine, module, optimizer, _ = _private()
    buffer = io.BytesIO()
    engine.save_checkpoint(path=buffer, module=module, optimizer=optimizer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)["module_state_dict"]
    plain = nn.Linear(4, 3)
    plain.load_state_dict(state)
    assert torch.equal(plain.weight, module._module.weight)


def test_an_opacus_checkpoint_with_prefixed_keys_loads():
    engine, module, optimizer, _ = _private(seed=3)
    target_engine, target, _, _ = _private(seed=4)
    buffer = io.BytesIO()
    torch.save({"module_state_dict": module.state_dict(),  # Opacus saves the wrapper's keys
                "privacy_accountant_state_dict": engine.accountant.state_dict()}, buffer)
    buffer.seek(0)
    target_engine.load_checkpoint(path=buffer, module=target)
    assert torch.equal(target._module.weight, module._module.weight)
