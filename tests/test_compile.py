"""torch.compile with fastdp's layer routing, and a DP step without host synchronisation.

Compilation is tested with backend="aot_eager" (dynamo + AOTAutograd, no code generation): the
inductor C++ backend also works on CPU but takes ~40 s for a tiny model, too slow for CI. Each
routed layer call is one graph break (its backward hands the engine the output gradient, a Python
side effect), so the layers' internals compile and the routing stays eager.
"""

import copy
import traceback
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from fastdp import PrivacyEngine
from fastdp.engine.clipping import FlatClipping
from fastdp.engine.grad_sample_module import GradSampleModule

HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (``.item()``, ``bool(t)``, ``if t.any()``):
    on a GPU those synchronise and cannot be captured in a CUDA graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            raise AssertionError(f"host sync {func} at {traceback.extract_stack()[-3]}")
        return func(*args, **(kwargs or {}))


def test_compiled_hf_model_step_equals_eager_and_does_not_recompile():
    pytest.importorskip("transformers")
    import torch._dynamo

    from . import hf_tiny

    def one_layer_gpt2():
        model = hf_tiny.gpt2()
        model.transformer.h = model.transformer.h[:1]
        return model

    torch.manual_seed(0)
    model = one_layer_gpt2()
    eager_model = copy.deepcopy(model)
    batch = hf_tiny.lm_batch(pad_last=2)
    expected, _ = hf_tiny.dp_step(eager_model, batch, hf_tiny.lm_loss, 0.5)
    torch._dynamo.reset()
    compiled = {}

    def compile_once(gsm):
        compiled.setdefault("module", torch.compile(gsm, backend="aot_eager"))
        return compiled["module"]

    update, gsm = hf_tiny.dp_step(model, batch, hf_tiny.lm_loss, 0.5, wrap=compile_once)
    hf_tiny.assert_close(update, expected, rtol=1e-5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    other = hf_tiny.lm_batch(seed=1)  # same shapes, other values: no recompilation
    hf_tiny.lm_loss(compiled["module"](**hf_tiny.model_inputs(other)), other).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def _padded_private_model(sync_free: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(30, 8), nn.LayerNorm(8), nn.Flatten(), nn.Linear(8 * 4, 3))
    data = TensorDataset(torch.randint(0, 30, (40, 4)), torch.randint(0, 3, (40,)))
    engine = PrivacyEngine(accountant="rdp")
    gsm, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(seed), padded_batch_size=16,
    )
    gsm.sync_free = sync_free
    return model, gsm, optimizer, loader


def _masked_step(gsm, optimizer, x, y, mask):
    optimizer.zero_grad()
    losses = nn.functional.cross_entropy(gsm(x), y, reduction="none")
    ((losses * mask).sum() / len(mask)).backward()
    optimizer.step()


def test_padded_dp_step_makes_no_host_sync_and_equals_the_default_step():
    results = []
    for sync_free in (False, True):
        model, gsm, optimizer, loader = _padded_private_model(sync_free)
        batches = list(loader)[:3]
        for x, y, mask in batches:
            if sync_free:
                with NoHostSync():
                    _masked_step(gsm, optimizer, x, y, mask)
            else:
                _masked_step(gsm, optimizer, x, y, mask)
        assert len({len(mask) for _, _, mask in batches}) == 1  # fixed shape
        results.append([p.detach().clone() for p in model.parameters()])
    for default, sync_free in zip(*results):
        torch.testing.assert_close(sync_free, default)
    with pytest.raises(AssertionError, match="host sync"):  # the default path does check on the host
        _, gsm, optimizer, loader = _padded_private_model(False)
        with NoHostSync():
            _masked_step(gsm, optimizer, *next(iter(loader)))


def test_sync_free_step_still_drops_non_finite_samples():
    x = torch.randn(5, 4)
    x[2] = float("inf")
    grads = {}
    for sync_free in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(1.0))
        gsm.sync_free = sync_free
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gsm(x).square().sum().backward()
        assert len(caught) == gsm.skipped_samples == (0 if sync_free else 1)  # no warning, no count
        grads[sync_free] = [p.grad for p in model.parameters()]
    for sync_free_grad, default_grad in zip(grads[True], grads[False]):
        assert torch.isfinite(sync_free_grad).all()
        torch.testing.assert_close(sync_free_grad, default_grad)
