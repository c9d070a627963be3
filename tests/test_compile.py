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

aten = torch.ops.aten
#: ops that read a tensor's value on the host (``.item()``, ``bool(t)``, ``if t.any()``), or whose
#: output size depends on values (``torch.unique``, boolean indexing): on a GPU these synchronise
#: and cannot be captured in a CUDA graph. (On CPU they do not sync, hence this list.)
HOST_SYNCS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.nonzero.default, aten.masked_select.default,
}


def _syncs(func, args, kwargs) -> bool:
    if func in HOST_SYNCS:
        return True
    if func is aten.index.Tensor:  # x[bool_mask]
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if func is aten.repeat_interleave.Tensor:  # the output size is the sum of the repeats
        return kwargs.get("output_size") is None
    return False


class NoHostSync(TorchDispatchMode):
    """Fails on any op in HOST_SYNCS."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            raise AssertionError(f"host sync {func} at {traceback.extract_stack()[-3]}")
        return func(*args, **kwargs)


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


def _sequence_model():
    from fastdp.layers import DPLSTM, DPMultiheadAttention

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8, padding_idx=0)
            self.lstm = DPLSTM(8, 8, batch_first=True, bidirectional=True)
            self.attention = DPMultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.RMSNorm(16)
            self.bag = nn.EmbeddingBag(20, 16, mode="mean")
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            h, _ = self.lstm(self.embed(ids))
            h, _ = self.attention(h, h, h, need_weights=False)
            return self.head(self.norm(h).mean(1) + self.bag(ids))

    return Model(), torch.randint(0, 20, (6, 5))


def _image_model():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.InstanceNorm2d(8, affine=True), nn.LayerNorm([3, 3]), nn.Flatten(), nn.Linear(72, 3),
    )
    return model, torch.randn(6, 3, 8, 8)


@pytest.mark.parametrize("build", [_sequence_model, _image_model], ids=["sequence", "image"])
@pytest.mark.parametrize("mode", ["bk", "hooks"])
@pytest.mark.filterwarnings("ignore:poisson_sampling=False")
def test_sync_free_step_of_every_layer_type_makes_no_host_sync(build, mode):
    """Forward, backward (norms, clipping) and the optimizer's noise and update, for every fastdp layer rule."""
    torch.manual_seed(0)
    model, x = build()
    y = torch.randint(0, 3, (len(x),))
    engine = PrivacyEngine(accountant="rdp")
    data = DataLoader(TensorDataset(x, y), batch_size=len(x))
    gsm, optimizer, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
    )
    gsm.sync_free = True
    mask = torch.ones(len(x))
    with NoHostSync():
        _masked_step(gsm, optimizer, x, y, mask)
    assert all(torch.isfinite(p).all() for p in model.parameters())
