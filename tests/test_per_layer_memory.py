"""Per-layer clipping inside the backward: each call used once is clipped when its output gradient
arrives, and its activations are released then; shared parameters wait for the end of the backward.
Steps are checked against per-sample autograd, non-finite samples against the per-layer bound."""

import copy
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastdp import PrivacyEngine
from fastdp.engine.clipping import FlatClipping, PerLayerClipping
from fastdp.engine.grad_sample_module import GradSampleModule

from .models import make, microbatch_per_sample_grads
from .rule_testing import BOUND_RTOL, assert_norm_bounds

BATCH = 6


def _bounds_from(grads):
    """One bound per parameter at the median of its per-sample norms: some samples clipped, some not."""
    return {name: float(g.flatten(1).norm(dim=1).median()) + 1e-3 for name, g in grads.items()}


def _per_layer_reference(grads, bounds):
    out = {}
    for name, g in grads.items():
        factors = (bounds[name] / (g.flatten(1).double().norm(dim=1) + 1e-6)).clamp(max=1.0)
        out[name] = torch.einsum("b,b...->...", factors.to(g.dtype), g)
    return out


def _policy(model, bounds):
    return PerLayerClipping({id(p): bounds[n] for n, p in model.named_parameters()})


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", ["mlp", "sequence", "fallback", "tied", "cnn"])
def test_per_layer_step_equals_microbatching(name, reduction):
    model, make_input, classes = make(name)
    torch.manual_seed(1)
    x, y = make_input(BATCH), torch.randint(0, classes, (BATCH,))
    grads = microbatch_per_sample_grads(model, x, y)
    bounds = _bounds_from(grads)
    gsm = GradSampleModule(model, loss_reduction=reduction, clipping=_policy(model, bounds))
    F.cross_entropy(gsm(x), y, reduction=reduction).backward()
    expected_norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in grads.values()))
    assert_norm_bounds(gsm.per_sample_norms, expected_norms, atol=1e-6)
    expected = _per_layer_reference(grads, bounds)
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[param_name], rtol=BOUND_RTOL, atol=1e-6)
    assert not gsm._calls and gsm._early is None


def _three_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def _state_during_first_layer_backward(policy_for):
    """(calls waiting in the engine, calls already clipped with their activations still held, and which
    later layers already had their clipped sums), seen just before the first layer's own backward."""
    model = _three_layers()
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=policy_for(model))
    clipped_calls = []
    original = gsm._clip_in_backward

    def recording(call):
        clipped_calls.append(call)
        original(call)

    gsm._clip_in_backward = recording
    seen = {}

    def inspect(grad):
        seen["waiting"] = len(gsm._calls)
        seen["holding"] = sum(call.inputs is not None or call.grad_output is not None for call in clipped_calls)
        seen["done"] = [model[k].weight.grad is not None for k in (2, 4)]

    def watch(module, args, out):
        out.register_hook(inspect)  # runs when the first layer's output gradient is ready

    model[0].register_forward_hook(watch)
    x, y = torch.randn(BATCH, 5), torch.randint(0, 3, (BATCH,))
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    return seen, len(clipped_calls)


def test_per_layer_releases_each_layers_activations_inside_the_backward():
    seen, clipped = _state_during_first_layer_backward(lambda m: _policy(m, {n: 0.1 for n, _ in m.named_parameters()}))
    assert seen == {"waiting": 0, "holding": 0, "done": [True, True]}
    assert clipped == 3
    # the control: flat clipping must keep both later layers' calls until the end of the backward
    seen, clipped = _state_during_first_layer_backward(lambda m: FlatClipping(0.1))
    assert seen == {"waiting": 2, "holding": 0, "done": [False, False]}
    assert clipped == 0


def test_a_layer_applied_twice_waits_for_the_end_and_stays_exact():
    model, make_input, classes = make("tied")  # embedding tied to the output layer, one block applied twice
    torch.manual_seed(1)
    x, y = make_input(BATCH), torch.randint(0, classes, (BATCH,))
    grads = microbatch_per_sample_grads(model, x, y)
    bounds = _bounds_from(grads)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=_policy(model, bounds))
    early = []
    original = gsm._clip_in_backward
    gsm._clip_in_backward = lambda call: (early.append(call.module), original(call))
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    assert early == []  # every parameter of this model is shared
    expected = _per_layer_reference(grads, bounds)
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[param_name], rtol=BOUND_RTOL, atol=1e-6)


def test_backward_passes_accumulate_and_a_forward_without_grad_changes_nothing():
    model = _three_layers()
    reference = copy.deepcopy(model)
    bounds = {n: 0.2 for n, _ in model.named_parameters()}
    gsm = GradSampleModule(model, loss_reduction="mean", clipping=_policy(model, bounds))
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))), (torch.randn(3, 5), torch.randint(0, 3, (3,)))]
    for x, y in batches:
        with torch.no_grad():
            gsm(x)  # an evaluation pass in between must not stop the clipping inside the backward
        F.cross_entropy(gsm(x), y).backward()
    assert gsm.backward_passes == 2
    for param_name, param in model.named_parameters():
        expected = sum(
            _per_layer_reference(microbatch_per_sample_grads(reference, x, y), bounds)[param_name] for x, y in batches
        )
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)


def _nonfinite_batch():
    torch.manual_seed(1)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    x[0] *= 1e15  # finite gradient with a huge norm: clipped to its bounds, not dropped
    x[1] *= 1e30  # squared norm overflows float32, not the float64 the bounds are computed in: clipped too
    x[2, 0] = math.inf
    x[3, 1] = math.nan
    return x, y


def _per_layer_sum(x, y, bounds):
    model = _three_layers()
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=_policy(model, bounds))
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, gsm


def test_no_sample_moves_a_parameter_by_more_than_its_bound():
    x, y = _nonfinite_batch()
    bounds = {n: 0.1 * (k + 1) for k, (n, _) in enumerate(_three_layers().named_parameters())}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        total, gsm = _per_layer_sum(x, y, bounds)
    assert gsm.skipped_samples == 2  # counted once each, though found in several layers
    assert all(torch.isfinite(g).all() for g in total.values())
    for i in range(x.shape[0]):
        keep = [j for j in range(x.shape[0]) if j != i]
        with pytest.warns(RuntimeWarning, match="non-finite"):  # one or both of samples 2-3 remain
            without_i, _ = _per_layer_sum(x[keep], y[keep], bounds)
        own = microbatch_per_sample_grads(_three_layers(), x[i : i + 1], y[i : i + 1])
        for name, bound in bounds.items():
            contribution = (total[name] - without_i[name]).norm().item()
            assert contribution <= bound * (1 + 1e-5), (i, name, contribution)
            # a layer where the sample's gradient is finite (sample 0's is huge) has it clipped to the
            # bound; one where it is not (inf/NaN, or a norm overflowing float32) leaves it out
            norm = own[name].double().norm().item()
            expected = min(norm, bound) if math.isfinite(norm) else 0.0
            assert abs(contribution - expected) <= 1e-4 * bound, (i, name, contribution, expected)


def _engine_with_scaler(init_scale, overflow=False):
    model = _three_layers()
    reference = copy.deepcopy(model)
    bounds = [0.2] * len(list(model.parameters()))
    x, y = torch.randn(BATCH, 5), torch.randint(0, 3, (BATCH,))
    if overflow:  # what an fp16 overflow leaves: a non-finite output gradient
        x[0, 0] = math.inf
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    engine = PrivacyEngine(accountant="rdp")
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    gsm, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=bounds, clipping="per_layer", loss_reduction="sum", grad_scaler=scaler,
        poisson_sampling=False,
    )
    return model, reference, gsm, optimizer, scaler, engine, x, y


@pytest.mark.filterwarnings("ignore:poisson_sampling=False")
@pytest.mark.parametrize("init_scale,overflow", [(2.0**10, False), (2.0**100, False), (2.0**10, True)])
def test_grad_scaler_with_per_layer_clipping_inside_the_backward(init_scale, overflow):
    """2^100: squared norms beyond float32's range are still bounded (in float64); a non-finite gradient
    under a scaler is an overflow: the step is skipped, not counted."""
    model, reference, gsm, optimizer, scaler, engine, x, y = _engine_with_scaler(init_scale, overflow)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.scale(F.cross_entropy(gsm(x), y, reduction="sum")).backward()
    scaler.step(optimizer)
    scaler.update()
    if overflow:
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert len(engine.accountant) == 0 and gsm.skipped_samples == 0 and scaler.get_scale() < init_scale
        return
    expected = _per_layer_reference(
        microbatch_per_sample_grads(reference, x, y), {n: 0.2 for n, _ in model.named_parameters()}
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-5, atol=1e-6)
    assert len(engine.accountant) == 1


class _Checkpointed(nn.Module):
    """``shared`` runs inside a checkpointed segment and again after it: with reentrant checkpointing
    its second use reaches the backward before the segment is recomputed (and its first use with it)."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.first, self.shared, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.shared(t)), h, use_reentrant=self.reentrant)
        return self.head(torch.tanh(self.shared(h)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_per_layer_with_activation_checkpointing_equals_microbatching(reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    x, y = torch.randn(BATCH, 5, requires_grad=reentrant), torch.randint(0, 3, (BATCH,))
    reference = copy.deepcopy(model)
    reference.reentrant = False  # the same function; autograd.grad refuses reentrant checkpoints
    grads = microbatch_per_sample_grads(reference, x.detach(), y)
    bounds = _bounds_from(grads)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=_policy(model, bounds))
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    expected = _per_layer_reference(grads, bounds)
    for param_name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[param_name], rtol=1e-5, atol=1e-6)
