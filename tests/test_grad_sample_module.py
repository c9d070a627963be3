"""GradSampleModule against microbatching: per-sample norms, per-sample grads, clipped sums."""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastdp.engine.clipping import FlatClipping
from fastdp.engine.grad_sample_module import GradSampleModule

from .models import MODELS, clipped_sum, make, microbatch_per_sample_grads
from .rule_testing import assert_norm_bounds

BATCH = 5


def _data(make_input, classes, batch=BATCH, seed=1):
    torch.manual_seed(seed)
    return make_input(batch), torch.randint(0, classes, (batch,))


def _loss(output, y, reduction):
    return F.cross_entropy(output, y, reduction=reduction)


def _assert_close(actual, expected, rtol=1e-5, scale=None):
    """Normwise relative error; ``scale`` (the whole model's gradient norm) for parameters whose own
    gradient is structurally ~0 (a conv bias before InstanceNorm) and only rounding noise remains."""
    expected = expected.to(actual.dtype)
    scale = expected.norm() if scale is None else max(float(expected.norm()), scale)
    assert (actual - expected).norm() <= rtol * scale, f"{(actual - expected).norm() / scale:.3g}"


def _total_norm(grads):
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads.values())))


@pytest.mark.parametrize("mode", ["bk", "hooks", "functorch"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", list(MODELS))
def test_norms_and_clipped_sum_equal_microbatching(name, reduction, mode):
    model, make_input, classes = make(name)
    x, y = _data(make_input, classes)
    expected = microbatch_per_sample_grads(model, x, y)
    expected_norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in expected.values()))
    max_grad_norm = float(expected_norms.median())  # some samples clipped, some not
    gsm = GradSampleModule(model, loss_reduction=reduction, mode=mode, clipping=FlatClipping(max_grad_norm))
    _loss(gsm(x), y, reduction).backward()

    assert_norm_bounds(gsm.per_sample_norms, expected_norms)
    reference = clipped_sum(expected, max_grad_norm)
    for param_name, param in model.named_parameters():
        _assert_close(param.grad, reference[param_name], scale=_total_norm(reference))
        if mode != "bk":
            _assert_close(param.grad_sample, expected[param_name], scale=_total_norm(expected))


@pytest.mark.parametrize("name", ["mlp", "sequence", "cnn"])
def test_huge_clip_bound_gives_the_non_private_gradient(name):
    model, make_input, classes = make(name)
    x, y = _data(make_input, classes)
    reference = copy.deepcopy(model)
    _loss(reference(x), y, "mean").backward()
    gsm = GradSampleModule(model, clipping=FlatClipping(1e9))
    _loss(gsm(x), y, "mean").backward()
    scale = _total_norm({n: q.grad for n, q in reference.named_parameters()})
    for p, q in zip(model.parameters(), reference.parameters()):
        _assert_close(p.grad / BATCH, q.grad, scale=scale)


def test_batch_second_sequence_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    tokens = torch.randint(0, 9, (6, BATCH))  # [T, B]
    grad_out = torch.randn(6, BATCH, 3)
    per_sample = []
    for i in range(BATCH):
        ref = copy.deepcopy(model)
        (ref(tokens[:, i : i + 1]) * grad_out[:, i : i + 1]).sum().backward()
        per_sample.append(torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters())))
    gsm = GradSampleModule(model, batch_first=False, loss_reduction="sum")
    (gsm(tokens) * grad_out).sum().backward()
    torch.testing.assert_close(gsm.per_sample_norms, torch.stack(per_sample), rtol=1e-5, atol=1e-7)


def test_frozen_layers_cost_nothing_and_get_no_grad():
    model, make_input, classes = make("cnn")
    model[0].requires_grad_(False)
    model[6].bias.requires_grad_(False)
    x, y = _data(make_input, classes)
    expected = microbatch_per_sample_grads(model, x, y)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(0.5))
    _loss(gsm(x), y, "sum").backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None and model[6].bias.grad is None
    reference = clipped_sum(expected, 0.5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            _assert_close(p.grad, reference[n], scale=_total_norm(reference))


def test_no_non_private_weight_gradient_is_formed():
    """Autograd never computes a routed layer's weight gradient: mm is called only for outputs/inputs."""
    model, make_input, classes = make("mlp")
    x, y = _data(make_input, classes)
    gsm = GradSampleModule(model, clipping=FlatClipping(1.0))
    loss = _loss(gsm(x), y, "mean")
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is None for g in grads)  # autograd itself produced none of them...
    assert all(p.grad is not None for p in model.parameters())  # ...the engine wrote the clipped sums


@pytest.mark.parametrize("batch", [1, 0])
def test_tiny_and_empty_batches(batch):
    model, make_input, classes = make("sequence")
    x, y = _data(make_input, classes, batch=batch)
    expected = clipped_sum(microbatch_per_sample_grads(model, x, y), 1.0) if batch else None
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(1.0))
    _loss(gsm(x), y, "sum").backward()
    assert gsm.per_sample_norms.shape == (batch,)
    if batch == 0:
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    else:
        for n, p in model.named_parameters():
            _assert_close(p.grad, expected[n])


def test_accumulates_over_backward_passes_like_autograd():
    model, make_input, classes = make("mlp")
    x, y = _data(make_input, classes, batch=8)
    expected = clipped_sum(microbatch_per_sample_grads(model, x, y), 0.3)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(0.3))
    for part in (slice(0, 3), slice(3, 8)):
        _loss(gsm(x[part]), y[part], "sum").backward()
    assert gsm.backward_passes == 2
    for n, p in model.named_parameters():
        _assert_close(p.grad, expected[n])


def test_without_a_policy_norms_then_custom_factors():
    model, make_input, classes = make("sequence")
    x, y = _data(make_input, classes)
    expected = microbatch_per_sample_grads(model, x, y)
    gsm = GradSampleModule(model, loss_reduction="sum")
    _loss(gsm(x), y, "sum").backward()
    assert all(p.grad is None for p in model.parameters())
    factors = torch.rand(BATCH)
    gsm.accumulate_clipped_grads(factors)
    for n, p in model.named_parameters():
        _assert_close(p.grad, torch.einsum("b,b...->...", factors, expected[n]))
    with pytest.raises(ValueError, match="loss.backward"):
        gsm.accumulate_clipped_grads(factors)


def test_deepcopy_of_a_routed_model_is_routed_to_itself():
    model, make_input, classes = make("sequence")
    x, y = _data(make_input, classes)
    expected = microbatch_per_sample_grads(model, x, y)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(1e9))
    twin = copy.deepcopy(gsm)
    _loss(twin(x), y, "sum").backward()
    assert all(p.grad is None for p in model.parameters())
    for n, p in twin._module.named_parameters():
        _assert_close(p.grad, expected[n].sum(0))


def test_standard_module_restored():
    model, make_input, classes = make("mlp")
    gsm = GradSampleModule(model)
    assert gsm.to_standard_module() is model
    x, y = _data(make_input, classes)
    _loss(model(x), y, "mean").backward()
    assert all(p.grad is not None for p in model.parameters())  # plain autograd again


def test_bad_input_errors():
    with pytest.raises(ValueError, match="ModuleValidator.fix"):
        GradSampleModule(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="no fastdp rule for 1 .*register_grad_sampler"):
        GradSampleModule(make("fallback")[0], strict=True)
    with pytest.raises(ValueError, match="loss_reduction"):
        GradSampleModule(nn.Linear(2, 2), loss_reduction="avg")
    with pytest.raises(ValueError, match="grad_sample_mode"):
        GradSampleModule(nn.Linear(2, 2), mode="fast")
    with pytest.raises(ValueError, match="max_norm"):
        GradSampleModule(nn.Embedding(5, 2, max_norm=1.0))
    assert GradSampleModule(nn.Linear(2, 2), mode="ghost").mode == "bk"
