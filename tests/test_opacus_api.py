"""Opacus's public API on fastdp: module paths, the GradSampleModule classes by mode, GradSampleHooks
(wrap_model=False), validator registration, per-sample-gradient checks, ghost-clipping loss wrappers,
optimizer classes by clipping, data-loader helpers."""

import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from fastdp import PrivacyEngine
from fastdp.data_loader import CollateFnWithEmpty, DPDataLoader, switch_generator, wrap_collate_with_empty
from fastdp.grad_sample import (
    GradSampleHooks,
    GradSampleModule,
    GradSampleModuleFastGradientClipping,
    compute_conv_grad_sample,
    compute_embedding_norm_sample,
    compute_linear_grad_sample,
    get_gsm_class,
    prepare_module,
)
from fastdp.layers import SequenceBias
from fastdp.optimizers import AdaClipDPOptimizer, DPOptimizer, DPPerLayerOptimizer, get_optimizer_class
from fastdp.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from fastdp.utils.module_utils import are_state_dict_equal, clone_module, trainable_modules
from fastdp.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from fastdp.validators import (
    IllegalModuleConfigurationError,
    ModuleValidator,
    ShouldReplaceModuleError,
    UnsupportedModuleError,
    register_module_fixer,
    register_module_validator,
)

from .models import microbatch_per_sample_grads

OPACUS_MODULES = [
    "optimizers.optimizer", "optimizers.perlayeroptimizer", "optimizers.adaclipoptimizer", "optimizers.ddpoptimizer",
    "optimizers.ddp_perlayeroptimizer", "optimizers.optimizer_fast_gradient_clipping",
    "optimizers.ddpoptimizer_fast_gradient_clipping", "schedulers", "schedulers.noise_scheduler",
    "schedulers.grad_clip_scheduler", "validators.errors", "validators.utils", "layers.dp_multihead_attention",
    "layers.dp_rnn", "grad_sample.utils", "grad_sample.gsm_exp_weights", "grad_sample.gsm_base",
    "grad_sample.grad_sample_module", "grad_sample.grad_sample_module_fast_gradient_clipping", "grad_sample.linear",
    "grad_sample.conv", "grad_sample.embedding", "grad_sample.embedding_norm_sample", "utils.module_utils",
    "utils.packed_sequences", "utils.per_sample_gradients_utils", "utils.tensor_utils",
    "utils.fast_gradient_clipping_utils",
]


@pytest.mark.parametrize("path", OPACUS_MODULES)
def test_opacus_module_paths_import(path):
    importlib.import_module("fastdp." + path)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_gsm_classes_by_mode_materialise_per_sample_gradients(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    expected = microbatch_per_sample_grads(model, x, y)
    gsm = prepare_module(model, mode, loss_reduction="sum")
    assert isinstance(gsm, GradSampleModule)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], rtol=1e-4, atol=1e-6)


def test_ghost_class_is_bk_with_opacus_constructor_and_clipping_coefficients():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(6, 5) * 4, torch.randint(0, 3, (6,))
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in microbatch_per_sample_grads(model, x, y).values()))
    gsm = get_gsm_class("ghost")(model, max_grad_norm=0.5, use_ghost_clipping=True, loss_reduction="sum")
    assert isinstance(gsm, GradSampleModuleFastGradientClipping) and gsm.mode == "bk"
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    torch.testing.assert_close(gsm.get_norm_sample(), norms, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gsm.get_clipping_coef(), (0.5 / (norms + 1e-6)).clamp(max=1.0), rtol=1e-4, atol=1e-6)


def test_wrap_model_false_trains_the_original_model_object():
    """make_private(wrap_model=False): the user keeps calling the model itself; the step is the same as
    with the wrapper, and cleanup() gives back a plain model (non-private gradients again)."""

    def run(wrap):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        data = TensorDataset(torch.randn(32, 6) * 3, torch.randint(0, 3, (32,)))
        returned, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=DataLoader(data, batch_size=8),
            noise_multiplier=0.0, max_grad_norm=0.3, poisson_sampling=False, wrap_model=wrap,
        )
        forward = returned if wrap else model
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
        return model, returned

    wrapped, _ = run(True)
    hooked, hooks = run(False)
    assert isinstance(hooks, GradSampleHooks) and not isinstance(hooks, nn.Module) and hooks.hooks_enabled
    hooks.disable_hooks()
    assert not hooks.hooks_enabled
    hooks.enable_hooks()
    for p, q in zip(wrapped.parameters(), hooked.parameters()):
        torch.testing.assert_close(p, q)
    hooks.cleanup()
    x = torch.randn(3, 6)
    hooked(x).sum().backward()  # plain autograd again: a non-private gradient, and no fastdp attribute
    assert all(p.grad is not None and not hasattr(p, "grad_sample") for p in hooked.parameters())


def test_compute_grad_sample_functions_match_microbatching():
    torch.manual_seed(0)
    linear, conv = nn.Linear(5, 3), nn.Conv2d(2, 3, 3)
    x, backprops = torch.randn(4, 5), torch.randn(4, 3)
    grads = compute_linear_grad_sample(linear, [x], backprops)
    torch.testing.assert_close(grads[linear.weight], torch.einsum("bo,bi->boi", backprops, x))
    torch.testing.assert_close(grads[linear.bias], backprops)
    image = torch.randn(2, 2, 6, 6)
    out_grad = torch.randn(2, 3, 4, 4)
    grads = compute_conv_grad_sample(conv, [image], out_grad)
    for i in range(2):
        expected = torch.autograd.grad((conv(image[i : i + 1]) * out_grad[i : i + 1]).sum(), conv.weight)[0]
        torch.testing.assert_close(grads[conv.weight][i], expected, rtol=1e-4, atol=1e-5)


def test_embedding_norm_sample_without_per_sample_gradients():
    emb = nn.Embedding(3, 1)
    ids = torch.tensor([[1, 1], [2, 0], [2, 0]])
    backprops = torch.tensor([[[0.2], [0.2]], [[0.3], [0.1]], [[0.3], [0.1]]])
    norms = compute_embedding_norm_sample(emb, [ids], backprops)[emb.weight]
    torch.testing.assert_close(norms, torch.tensor([0.4, (0.09 + 0.01) ** 0.5, (0.09 + 0.01) ** 0.5]))


def test_grad_samplers_registry_swaps_a_rule_and_puts_it_back():
    registry = GradSampleModule.GRAD_SAMPLERS
    original = registry[nn.Linear]
    calls = []

    def doubled(layer, activations, backprops):
        calls.append(1)
        return {p: 2 * g for p, g in compute_linear_grad_sample(layer, activations, backprops).items()}

    registry[nn.Linear] = doubled
    try:
        torch.manual_seed(0)
        layer = nn.Linear(3, 2)
        gsm = get_gsm_class("hooks")(layer, loss_reduction="sum")
        x = torch.randn(4, 3)
        gsm(x).sum().backward()
        assert calls and torch.allclose(layer.bias.grad_sample, 2 * torch.ones(4, 2))
    finally:
        registry[nn.Linear] = original
    layer = nn.Linear(3, 2)
    gsm = get_gsm_class("hooks")(layer, loss_reduction="sum")
    gsm(torch.randn(4, 3)).sum().backward()
    assert torch.allclose(layer.bias.grad_sample, torch.ones(4, 2))


def test_sequence_bias_per_sample_gradients():
    torch.manual_seed(0)
    for batch_first in (True, False):
        x = torch.randn(3, 5, 4) if batch_first else torch.randn(5, 3, 4)
        assert check_per_sample_gradients_are_correct(x, SequenceBias(4, batch_first=batch_first),
                                                      batch_first=batch_first)


def test_per_sample_gradient_check_catches_a_wrong_grad_sampler():
    class Odd(nn.Linear):
        pass

    from fastdp.engine.rules import register_grad_sampler

    @register_grad_sampler(Odd)
    def wrong(layer, activations, backprops):
        return {layer.weight: torch.einsum("bo,bi->boi", backprops, activations[0]) * 1.5, layer.bias: backprops}

    assert not check_per_sample_gradients_are_correct(torch.randn(4, 3), Odd(3, 2))
    assert check_per_sample_gradients_are_correct(torch.randn(4, 3), nn.Linear(3, 2))


def test_validator_registry_and_error_classes():
    class Custom(nn.Linear):
        pass

    @register_module_validator(Custom)
    def validate(module):
        return [IllegalModuleConfigurationError("Custom layers need out_features > 2")] if module.out_features <= 2 else []

    @register_module_fixer(Custom)
    def fix(module, **kwargs):
        return nn.Linear(module.in_features, 3)

    try:
        errors = ModuleValidator.validate(nn.Sequential(nn.Linear(2, 2), Custom(2, 2)))
        assert len(errors) == 1 and isinstance(errors[0], IllegalModuleConfigurationError)
        assert errors[0].module_path == "1"
        fixed = ModuleValidator.fix(nn.Sequential(Custom(2, 2)))
        assert type(fixed[0]) is nn.Linear and ModuleValidator.is_valid(fixed)
    finally:
        ModuleValidator.VALIDATORS.pop(Custom), ModuleValidator.FIXERS.pop(Custom)
    (bn_error,) = ModuleValidator.VALIDATORS.get(nn.BatchNorm2d, lambda m: ModuleValidator.validate(m))(nn.BatchNorm2d(4))
    assert isinstance(bn_error, ShouldReplaceModuleError) and isinstance(bn_error, UnsupportedModuleError)
    assert isinstance(ModuleValidator.FIXERS[nn.BatchNorm2d](nn.BatchNorm2d(4)), nn.GroupNorm)


def test_fix_logs_each_replacement(caplog):
    with caplog.at_level(logging.INFO):
        ModuleValidator.fix(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)))
    assert any("Replaced sub_module 1 : BatchNorm1d" in r.getMessage() for r in caplog.records)


def test_module_utils():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert not are_state_dict_equal(a.state_dict(), b.state_dict())
    assert are_state_dict_equal(a.state_dict(), clone_module(a).state_dict())
    frozen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    frozen[0].requires_grad_(False)
    assert [name for name, _ in trainable_modules(frozen)] == ["1"]


def test_ghost_loss_wrappers_compute_per_sample_losses_and_one_backward():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    data = TensorDataset(x, y)
    engine = PrivacyEngine()
    module, optimizer, criterion, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=DataLoader(data, batch_size=6),
        noise_multiplier=0.0, max_grad_norm=1e6, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(),
        poisson_sampling=False,
    )
    assert isinstance(criterion, DPLossFastGradientClipping)
    loss = criterion(module(x), y)
    assert isinstance(loss, DPTensorFastGradientClipping) and loss.loss_per_sample.shape == (6,)
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
    combined = 0.5 * loss + loss / 2 - 0.0  # arithmetic acts on the per-sample losses
    combined.backward()
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x), y).backward()
    optimizer.step()
    torch.testing.assert_close(model.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-6)


def test_optimizer_classes_by_clipping():
    model = nn.Linear(3, 2)
    assert get_optimizer_class("flat", False) is DPOptimizer
    data = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    _, per_layer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=[0.5, 0.25], clipping="per_layer",
    )
    assert isinstance(per_layer, DPPerLayerOptimizer) and per_layer.max_grad_norms == [0.5, 0.25]
    model = nn.Linear(3, 2)
    _, adaptive, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="adaptive", target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2, max_clipbound=10.0, min_clipbound=0.1, unclipped_num_std=1.0,
    )
    assert isinstance(adaptive, AdaClipDPOptimizer) and adaptive.max_clipbound == 10.0


def test_collate_fn_with_empty_learns_the_structure():
    collate = wrap_collate_with_empty(collate_fn=default_collate)
    assert collate([]) == []  # nothing seen yet
    batch = collate([(torch.ones(3), torch.tensor(1)), (torch.zeros(3), torch.tensor(0))])
    assert batch[0].shape == (2, 3)
    empty = collate([])
    assert empty[0].shape == (0, 3) and empty[1].shape == (0,)
    seq_first = CollateFnWithEmpty(lambda samples: torch.stack(samples, 1), batch_first=False)
    seq_first([torch.ones(5, 2)])
    assert seq_first([]).shape == (5, 0, 2)
    rand = CollateFnWithEmpty(default_collate, rand_on_empty=True)
    rand([torch.ones(3)])
    made_up = rand([])
    assert made_up.shape == (1, 3) and bool(((made_up == 0) | (made_up == 1)).all())


def test_rand_on_empty_through_make_private():
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(50, 3), torch.randint(0, 2, (50,)))
    _, _, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=1),
        noise_multiplier=1.0, max_grad_norm=1.0, rand_on_empty=True, noise_generator=torch.Generator().manual_seed(0),
    )
    sizes = [len(x) for x, _ in loader]
    assert 0 not in sizes and 1 in sizes


def test_switch_generator_reproduces_poisson_batches():
    data = TensorDataset(torch.arange(100.0))
    loader = DPDataLoader(data, sample_rate=0.1)
    first = [b[0].tolist() for b in switch_generator(data_loader=loader, generator=torch.Generator().manual_seed(3))]
    again = [b[0].tolist() for b in switch_generator(data_loader=loader, generator=torch.Generator().manual_seed(3))]
    assert first == again and len(first) == 10
    with pytest.raises(ValueError, match="draws nothing"):  # a sequential loader has no generator to switch
        switch_generator(data_loader=DataLoader(data, batch_size=10), generator=torch.Generator())


def test_from_data_loader_distributed_splits_a_whole_dataset_loader():
    """Opacus's DDP tutorial: every rank builds DataLoader(ds, batch_size=64) over the whole dataset; the
    ranks' Poisson shares are disjoint and their union has the loader's mean batch size."""
    import torch.distributed as dist

    data = TensorDataset(torch.arange(400.0))
    loader = DataLoader(data, batch_size=40)
    shares = []
    original = dist.get_world_size, dist.get_rank
    try:
        for rank in range(2):
            dist.get_world_size, dist.get_rank = (lambda: 2), (lambda rank=rank: rank)
            shares.append(DPDataLoader.from_data_loader(loader, distributed=True,
                                                        generator=torch.Generator().manual_seed(5)))
    finally:
        dist.get_world_size, dist.get_rank = original
    assert all(s.sample_rate == pytest.approx(0.1) for s in shares)
    rank0 = [set(b[0].tolist()) for b in shares[0]]
    rank1 = [set(b[0].tolist()) for b in shares[1]]
    assert all(not (a & b) for a, b in zip(rank0, rank1))
    assert all(int(i) % 2 == 0 for batch in rank0 for i in batch)
    mean_union = sum(len(a) + len(b) for a, b in zip(rank0, rank1)) / len(rank0)
    assert 25 < mean_union < 55


def test_no_op_mode_clips_per_sample_gradients_you_compute_with_torch_func():
    """Opacus's cifar10 example: grad_sample_mode="no_op", per-sample gradients by torch.func
    (make_functional + vmap), set as p.grad_sample; the optimizer clips them at step()."""
    from torch.func import grad, vmap

    from fastdp.grad_sample.functorch import make_functional

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5) * 3, torch.randint(0, 3, (8,))
    expected = microbatch_per_sample_grads(model, x, y)
    module, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8), noise_multiplier=0.0, max_grad_norm=0.5,
        grad_sample_mode="no_op", poisson_sampling=False,
    )
    fmodel, _ = make_functional(model)

    def loss(params, sample, target):
        return F.cross_entropy(fmodel(params, sample.unsqueeze(0)), target.unsqueeze(0))

    params = list(model.parameters())
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for p, g in zip(params, per_sample):
        p.grad_sample = g.detach()
    optimizer.step()
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in expected.values()))
    factors = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    for (name, p) in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", factors, expected[name]) / 8, rtol=1e-4, atol=1e-6)
    optimizer.zero_grad()
    F.cross_entropy(module(x), y).backward()  # a plain backward in no_op mode is non-private: refused
    with pytest.raises(ValueError, match="non-private"):
        optimizer.step()


def test_gradsamplemodule_opacus_surface():
    """BatchNorm refused with Opacus's NotImplementedError (still a ValueError); with disable_hooks nothing is
    captured and a non-private gradient is refused, not written; cleanup leaves a plain model."""
    with pytest.raises(NotImplementedError):
        GradSampleModule(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError):
        GradSampleModule(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    gsm = get_gsm_class("hooks")(layer, loss_reduction="sum")
    gsm.disable_hooks()
    assert not gsm.hooks_enabled
    with pytest.raises(ValueError, match="outside the engine's capture"):
        gsm(torch.randn(4, 3)).sum().backward()
    assert layer.weight.grad is None and getattr(layer.weight, "grad_sample", None) is None
    gsm.zero_grad()
    gsm.enable_hooks()
    gsm(torch.randn(4, 3)).sum().backward()
    assert layer.weight.grad_sample.shape == (4, 2, 3)
    gsm.cleanup()
    assert not hasattr(layer.weight, "grad_sample")
    layer(torch.randn(4, 3)).sum().backward()  # a plain model again
    assert layer.weight.grad is not None


def test_switch_generator_on_a_shuffled_loader_matches_a_loader_built_with_that_generator():
    data = TensorDataset(torch.arange(80.0))
    built = [b[0].tolist() for b in DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))]
    source = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(99))
    switched = [b[0].tolist() for b in switch_generator(data_loader=source, generator=torch.Generator().manual_seed(5))]
    assert switched == built


@pytest.mark.parametrize(
    "layer, x_shape, batch_first",
    [
        (nn.Linear(4, 3), (5, 4), True),
        (nn.Conv2d(2, 3, 3, padding=1), (4, 2, 5, 5), True),
        (nn.Linear(4, 3), (5, 6, 4), False),  # the layer takes [T, B, d]; activations come batch-first
    ],
    ids=["linear", "conv2d", "linear-sequence-first"],
)
def test_opacus_functorch_helpers_give_per_sample_gradients(layer, x_shape, batch_first):
    """prepare_layer / ft_compute_per_sample_gradient (opacus.grad_sample.functorch, used by code that calls
    them directly): per-sample gradients of <layer(x_i), g_i>, as microbatching gives them."""
    from fastdp.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer

    torch.manual_seed(0)
    x = torch.randn(x_shape)  # batch-first, as a GradSampleModule records it
    g = torch.randn_like(layer(x if batch_first else x.transpose(0, 1)))
    g = g if batch_first else g.transpose(0, 1)
    prepare_layer(layer, batch_first=batch_first)
    grads = ft_compute_per_sample_gradient(layer, (x,), g)
    for p in layer.parameters():
        expected = []
        for i in range(x.shape[0]):
            xi, gi = x[i : i + 1], g[i : i + 1]
            if not batch_first:
                xi, gi = xi.transpose(0, 1), gi.transpose(0, 1)
            expected.append(torch.autograd.grad((layer(xi) * gi).sum(), p)[0])
        torch.testing.assert_close(grads[p], torch.stack(expected), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="buffers"):
        prepare_layer(nn.BatchNorm1d(3))
