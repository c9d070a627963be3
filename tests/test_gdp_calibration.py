"""A budget is never met with GDP's approximation alone: make_private_with_epsilon calibrates with PRV."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp import PrivacyEngine
from fastdp.accountants import create_accountant, get_noise_multiplier

TARGET, DELTA, EPOCHS, BATCHES = 2.0, 1e-5, 2, 10  # q = 0.1, 20 steps: where the CLT is most optimistic


def _true_epsilons(sigma):
    steps = int(EPOCHS * BATCHES)
    out = {}
    for name in ("prv", "pld"):
        acc = create_accountant(name)
        acc.history = [(sigma, 1 / BATCHES, steps)]
        out[name] = acc.get_epsilon(DELTA)
    return out


def test_gdp_sigma_alone_overshoots_the_budget_and_warns():
    """The reason for the rule: GDP's own calibration gives a σ whose rigorous ε is far above target."""
    with pytest.warns(UserWarning, match="approximation"):
        sigma = get_noise_multiplier(target_epsilon=TARGET, target_delta=DELTA, sample_rate=1 / BATCHES,
                                     epochs=EPOCHS, accountant="gdp")
    assert min(_true_epsilons(sigma).values()) > 2.5


def test_make_private_with_epsilon_under_gdp_meets_the_budget_rigorously():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    engine = PrivacyEngine(accountant="gdp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=100 // BATCHES), target_epsilon=TARGET, target_delta=DELTA,
            epochs=EPOCHS, max_grad_norm=1.0,
        )
    assert any("calibrated with the PRV accountant" in str(w.message) for w in caught)
    true = _true_epsilons(optimizer.noise_multiplier)
    assert true["prv"] <= TARGET and true["pld"] <= TARGET + 0.01  # PLD's grid is within its own interval
    assert true["prv"] > TARGET - 0.05  # and not needlessly noisy


def test_make_private_with_epsilon_warns_when_budget_was_already_spent():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.warns(UserWarning, match="already spent"):
        engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=10), target_epsilon=TARGET, target_delta=DELTA, epochs=1,
            max_grad_norm=1.0,
        )
