"""make_graphed_dp_step: a whole DP step as one CUDA-graph replay, accounted per replay.

On CPU the wrapper steps eagerly: those tests check that it is the ordinary training loop (same
parameters, same accountant history) and that it refuses what a replay would get wrong. The
CUDA tests (skipped without a GPU) check replays against eager steps, fresh noise per replay,
the accounting, the eager fallback for an oversized batch and the refusal of changed settings.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp import BatchMemoryManager, PrivacyEngine
from fastdp.graphed_step import capture_refusals, make_graphed_dp_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _model():
    return nn.Sequential(nn.Embedding(30, 8), nn.LayerNorm(8), nn.Flatten(), nn.Linear(8 * 4, 3))


def _private(device="cpu", sigma=1.0, generator="seeded", optimizer=None, padded_batch_size=16, **kwargs):
    torch.manual_seed(0)
    model = _model().to(device)
    data = TensorDataset(torch.randint(0, 30, (40, 4)), torch.randint(0, 3, (40,)))
    if generator == "seeded":
        generator = torch.Generator(device).manual_seed(1)
    engine = PrivacyEngine(accountant="rdp", **kwargs.pop("engine_kwargs", {}))
    gsm, dp_optimizer, loader = engine.make_private(
        module=model, optimizer=(optimizer or torch.optim.SGD)(model.parameters(), lr=0.5),
        data_loader=DataLoader(data, batch_size=8, generator=torch.Generator().manual_seed(2)),
        noise_multiplier=sigma, max_grad_norm=1.0, noise_generator=generator,
        padded_batch_size=padded_batch_size, **kwargs,
    )
    return model, gsm, dp_optimizer, loader, engine


def _loss_and_backward(gsm, batch):
    x, y, mask = batch
    loss = (F.cross_entropy(gsm(x), y, reduction="none") * mask).sum() / len(mask)
    loss.backward()
    return loss.detach()


def test_on_cpu_it_is_the_plain_training_loop():
    model, gsm, optimizer, loader, engine = _private()
    batches = list(loader)[:4]
    for x, y, mask in batches:
        optimizer.zero_grad()
        _loss_and_backward(gsm, (x, y, mask))
        optimizer.step()
    graphed_model, graphed_gsm, graphed_optimizer, graphed_loader, graphed_engine = _private()
    graphed_batches = list(graphed_loader)[:4]  # noise_generator also samples the batches (as in Opacus)
    step = make_graphed_dp_step(lambda batch: _loss_and_backward(graphed_gsm, batch), graphed_optimizer)
    for batch in graphed_batches:
        loss = step(batch)
        assert loss.shape == () and torch.isfinite(loss)
    for expected, got in zip(model.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(got, expected)
    assert graphed_engine.accountant.history == engine.accountant.history
    assert sum(steps for *_, steps in graphed_engine.accountant.history) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(engine_kwargs=dict(secure_mode=True), generator=None), "secure_mode"),
        (dict(clipping="adaptive", target_unclipped_quantile=0.5, unclipped_num_std=1.0), "adaptive"),
    ],
    ids=["secure_mode", "adaptive"],
)
def test_refuses_steps_that_a_replay_would_get_wrong(kwargs, message):
    _, gsm, optimizer, _, _ = _private(**kwargs)
    with pytest.raises(ValueError, match=message):
        make_graphed_dp_step(lambda batch: _loss_and_backward(gsm, batch), optimizer)


def test_refuses_a_grad_scaler_and_a_plain_optimizer():
    _, gsm, optimizer, _, _ = _private()
    optimizer.attach_grad_scaler(torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="grad_scaler"):
        make_graphed_dp_step(lambda batch: None, optimizer)
    with pytest.raises(ValueError, match="DPOptimizer that make_private returns"):
        make_graphed_dp_step(lambda batch: None, torch.optim.SGD(_model().parameters(), lr=0.1))


def test_on_cuda_refuses_host_side_noise_seeds_and_non_capturable_optimizers():
    """Checked without a GPU: the refusals depend only on the optimizer and the device named."""
    _, _, optimizer, _, _ = _private(generator="seeded")  # a CPU generator
    refusals = capture_refusals(optimizer, torch.device("cuda"))
    assert len(refusals) == 1 and "CPU generator" in refusals[0]
    assert capture_refusals(optimizer, torch.device("cpu")) == []
    _, _, adam, _, _ = _private(generator=None, optimizer=torch.optim.Adam)
    refusals = capture_refusals(adam, torch.device("cuda"))
    assert len(refusals) == 1 and "Adam(capturable=False)" in refusals[0]


def test_refuses_virtual_steps():
    _, gsm, optimizer, loader, _ = _private(padded_batch_size=None)
    step = make_graphed_dp_step(lambda batch: _loss_and_backward(gsm, (*batch, torch.ones(len(batch[0])))), optimizer)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=optimizer) as small_batches:
        with pytest.raises(ValueError, match="virtual steps"):
            for batch in small_batches:
                step(batch)


# -- on a GPU ---------------------------------------------------------------------------------------
def _cuda_runs(sigma, generator, steps=5, batches=None):
    """(eager parameters after each step, graphed parameters after each step, eager engine, graphed engine)."""
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model, gsm, optimizer, loader, engine = _private("cuda", sigma=sigma, generator=generator)
        batches = batches or [batch for batch, _ in zip(loader, range(steps))]
        params = []
        step = make_graphed_dp_step(lambda b: _loss_and_backward(gsm, b), optimizer) if graphed else None
        for batch in batches:
            if graphed:
                step(batch)
            else:
                optimizer.zero_grad()
                _loss_and_backward(gsm, [t.cuda() for t in batch])
                optimizer.step()
            params.append([p.detach().clone() for p in model.parameters()])
        results.append((params, engine, step))
    return results


@cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replays_equal_eager_steps(backend, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    (eager, eager_engine, _), (graphed, graphed_engine, step) = _cuda_runs(sigma=0.0, generator=None)
    assert step.replays == len(graphed) - 1
    for eager_params, graphed_params in zip(eager, graphed):
        for expected, got in zip(eager_params, graphed_params):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert graphed_engine.accountant.history == eager_engine.accountant.history
    assert sum(steps for *_, steps in graphed_engine.accountant.history) == len(graphed)


@cuda
@pytest.mark.parametrize("generator", ["default", "custom"])
def test_each_replay_draws_fresh_noise(generator):
    """With σ = 1 and the same batch every step, the updates must differ (a seed frozen into the
    graph would repeat them) and be reproducible from the generator's seed."""
    def updates():
        torch.manual_seed(3)
        noise_generator = torch.Generator("cuda").manual_seed(4) if generator == "custom" else None
        model, gsm, optimizer, loader, _ = _private("cuda", sigma=1.0, generator=noise_generator)
        batch = next(iter(loader))
        step = make_graphed_dp_step(lambda b: _loss_and_backward(gsm, b), optimizer)
        weight = model[3].weight
        before, result = weight.detach().clone(), []
        for _ in range(4):
            step(batch)
            result.append(weight.detach() - before)
            before = weight.detach().clone()
        return result

    first, second = updates(), updates()
    for a, b in zip(first, first[1:]):
        assert (a - b).abs().max() > 1e-3
    for a, b in zip(first[1:], first[2:]):  # replays, not only the eager first step
        assert not torch.equal(a, b)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@cuda
def test_an_oversized_batch_runs_eagerly_and_is_accounted():
    model, gsm, optimizer, loader, engine = _private("cuda", sigma=1.0, generator=None)
    step = make_graphed_dp_step(lambda b: _loss_and_backward(gsm, b), optimizer)
    x, y, mask = next(iter(loader))
    step((x, y, mask))
    step((x, y, mask))
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        step((torch.cat([x, x]), torch.cat([y, y]), torch.cat([mask, mask])))
    step((x, y, mask))
    assert step.replays == 2
    assert sum(steps for *_, steps in engine.accountant.history) == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@cuda
def test_a_setting_changed_after_the_capture_is_refused():
    _, gsm, optimizer, loader, _ = _private("cuda", generator=None)
    step = make_graphed_dp_step(lambda b: _loss_and_backward(gsm, b), optimizer)
    batch = next(iter(loader))
    step(batch)
    step(batch)
    for change in (lambda: optimizer.param_groups[0].update(lr=0.1), lambda: setattr(optimizer, "noise_multiplier", 2.0)):
        saved = copy.deepcopy((optimizer.param_groups[0]["lr"], optimizer.noise_multiplier))
        change()
        with pytest.raises(ValueError, match="changed after the step was captured"):
            step(batch)
        optimizer.param_groups[0]["lr"], optimizer.noise_multiplier = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(batch)


@cuda
def test_capturable_adam():
    _, gsm, optimizer, loader, _ = _private(
        "cuda", generator=None, optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr, capturable=True)
    )
    step = make_graphed_dp_step(lambda b: _loss_and_backward(gsm, b), optimizer)
    for batch, _ in zip(loader, range(3)):
        assert torch.isfinite(step(batch))
    assert step.replays == 2
