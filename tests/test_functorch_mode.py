"""grad_sample_mode="functorch" on models the bench found failing, against microbatching.

torch.func keeps every call it can split into samples; the DP recurrent layers (internal capture
points) and nn.EmbeddingBag's flat (input, offsets) form keep their exact rule instead.
"""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fastdp import ModuleValidator, PrivacyEngine
from fastdp.engine.clipping import FlatClipping
from fastdp.engine.grad_sample_module import GradSampleModule
from fastdp.layers import DPLSTM

from .models import clipped_sum, microbatch_per_sample_grads
from .rule_testing import assert_norm_bounds

BATCH, LENGTH, VOCAB = 5, 6, 19


class LSTMClassifier(nn.Module):
    """Embedding → nn.LSTM → Linear on the last step (the bench's model, smaller)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.embedding(tokens))
        return self.fc(out[:, -1])


class FlatBagClassifier(nn.Module):
    """EmbeddingBag called in the flat form: token 0 is "absent", so bags are ragged (one is empty)."""

    def __init__(self, **bag_options):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 4, **bag_options)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("token_weight", torch.rand(VOCAB, generator=torch.Generator().manual_seed(3)) + 0.5)

    def forward(self, tokens):
        present = tokens != 0
        ends = present.sum(1).cumsum(0)
        offsets = torch.cat([ends.new_zeros(1), ends if self.bag.include_last_offset else ends[:-1]])
        flat = tokens[present]
        weights = self.token_weight[flat] if self.bag.mode == "sum" else None
        return self.fc(self.bag(flat, offsets, per_sample_weights=weights))


def _tokens(seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    tokens[1] = 0  # an empty bag
    tokens[2, 0] = 0
    return tokens, torch.randint(0, 3, (BATCH,), generator=gen)


MODELS = {
    "lstm": lambda: ModuleValidator.fix(LSTMClassifier()),
    "bag_mean": lambda: FlatBagClassifier(mode="mean"),
    "bag_weighted_sum": lambda: FlatBagClassifier(mode="sum", include_last_offset=True),
}


def _assert_rel_close(actual, expected, rtol=1e-5):
    expected = expected.to(actual.dtype)
    error = (actual - expected).norm()
    assert error <= rtol * expected.norm() + 1e-7, f"{error / expected.norm():.3g}"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", list(MODELS))
def test_functorch_mode_equals_microbatching(name, reduction):
    torch.manual_seed(0)
    model = MODELS[name]()
    if name == "lstm":
        assert isinstance(model.lstm, DPLSTM)
    tokens, labels = _tokens()
    expected = microbatch_per_sample_grads(model, tokens, labels)
    norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in expected.values()))
    max_grad_norm = float(norms.median())  # some samples clipped, some not
    gsm = GradSampleModule(model, mode="functorch", loss_reduction=reduction, clipping=FlatClipping(max_grad_norm))
    F.cross_entropy(gsm(tokens), labels, reduction=reduction).backward()

    assert_norm_bounds(gsm.per_sample_norms, norms)
    reference = clipped_sum(expected, max_grad_norm)
    for param_name, param in model.named_parameters():
        _assert_rel_close(param.grad_sample, expected[param_name])
        _assert_rel_close(param.grad, reference[param_name])


@pytest.mark.filterwarnings("ignore:poisson_sampling=False")
def test_make_private_functorch_step_on_flat_bags():
    """The bench's path: one noiseless SGD step moves the weights by minus the mean clipped gradient."""
    torch.manual_seed(0)
    model = FlatBagClassifier(mode="mean")
    tokens, labels = _tokens()
    expected = microbatch_per_sample_grads(model, tokens, labels)
    max_grad_norm = float(torch.sqrt(sum(g.flatten(1).square().sum(1) for g in expected.values())).median())
    reference = clipped_sum(expected, max_grad_norm)
    start = copy.deepcopy(model.state_dict())
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=BATCH)
    private, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode="functorch",
    )
    F.cross_entropy(private(tokens), labels).backward()
    optimizer.step()
    for param_name, param in model.named_parameters():
        _assert_rel_close(start[param_name] - param.detach(), reference[param_name] / BATCH)


def test_one_token_per_bag_is_not_mistaken_for_one_row_per_sample():
    """Flat input of exactly B tokens: its rows are tokens, not samples, so the rule still takes it."""
    torch.manual_seed(0)
    model = FlatBagClassifier(mode="mean")
    tokens = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    tokens[torch.arange(BATCH), torch.arange(BATCH) % LENGTH] = torch.arange(1, BATCH + 1)
    labels = torch.arange(BATCH) % 3
    expected = microbatch_per_sample_grads(model, tokens, labels)
    gsm = GradSampleModule(model, mode="functorch", loss_reduction="sum")
    F.cross_entropy(gsm(tokens), labels, reduction="sum").backward()
    for param_name, param in model.named_parameters():
        _assert_rel_close(param.grad_sample, expected[param_name])


def test_flat_max_bag_is_refused_not_summed():
    """The rule that takes over the flat form refuses mode='max' (its gradient goes to arg-max rows)."""
    torch.manual_seed(0)
    tokens, labels = _tokens()
    gsm = GradSampleModule(FlatBagClassifier(mode="max"), mode="functorch")
    with pytest.raises(ValueError, match="mode='max'"):
        F.cross_entropy(gsm(tokens), labels).backward()


class ScaledLookup(nn.Module):
    """No rule: its second input is a table shared by the batch, not one row per sample."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(3))

    def forward(self, rows, table):
        return table[rows] * self.gain


def test_unsplittable_call_without_rule_is_a_clear_error():
    gsm = GradSampleModule(ScaledLookup(), mode="functorch")
    output = gsm(torch.tensor([0, 2, 1, 1]), torch.randn(7, 3))
    with pytest.raises(ValueError, match=r"input 1 has shape \(7, 3\).*register a rule"):
        output.square().sum().backward()


class AppendLearnedStep(nn.Module):
    """No rule (the torch.func fallback): appends a learned vector to every sequence, ``[T, B, E] →
    [T + 1, B, E]``, so its layout is batch-second, like Opacus's SequenceBias."""

    def __init__(self, dim):
        super().__init__()
        self.step = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        return torch.cat([x, self.step.expand(1, x.shape[1], -1)], dim=0)


@pytest.mark.parametrize("mode", ["bk", "hooks", "functorch"])
def test_the_fallback_keeps_a_batch_second_layout(mode):
    """With batch_first=False the fallback gives each sample to the layer batch-second (it gave the
    sample's rows batch-first, and the layer appended its vector to the wrong dimension)."""
    torch.manual_seed(0)
    layer = AppendLearnedStep(3)
    x, g = torch.randn(4, 5, 3), torch.randn(5, 5, 3)  # T = 4, B = 5
    gsm = GradSampleModule(layer, batch_first=False, loss_reduction="sum", mode=mode)
    (gsm(x) * g).sum().backward()
    expected = g[-1].double()  # sample i's gradient is its gradient at the appended step
    torch.testing.assert_close(gsm.per_sample_norms.double(), expected.norm(dim=1), rtol=1e-4, atol=1e-6)
    if mode != "bk":
        torch.testing.assert_close(layer.step.grad_sample.double(), expected)
