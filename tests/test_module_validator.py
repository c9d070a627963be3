"""ModuleValidator: errors with module paths, fixes that keep the model runnable, the input untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastdp.validators import ModuleValidator, UnsupportableModuleError, UnsupportedModuleError


class ConvNet(nn.Module):
    """BatchNorm at several depths, including one inside a nested block."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 48, 3), nn.ReLU(), nn.Conv2d(48, 64, 3), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(64, 12, 1), nn.BatchNorm2d(12, affine=False)))
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(10), nn.BatchNorm1d(10))

    def forward(self, x):
        return self.head(self.block(self.features(x)))


def state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture
def convnet():
    model = ConvNet()
    model(torch.randn(2, 3, 8, 8))  # materialise LazyLinear
    return model


def test_batchnorm_errors_name_their_paths(convnet):
    errors = ModuleValidator.validate(convnet)
    assert [e.module_path for e in errors] == ["features.3", "block.0.1", "head.2"]
    assert [e.module_type for e in errors] == ["BatchNorm2d", "BatchNorm2d", "BatchNorm1d"]
    assert str(errors[0]).startswith("features.3 (BatchNorm2d): BatchNorm mixes samples of a batch")
    assert all("ModuleValidator.fix(model) (BatchNorm → GroupNorm)" in str(e) for e in errors)
    assert all(isinstance(e, ValueError) for e in errors)
    assert not ModuleValidator.is_valid(convnet)


def test_validate_ignores_trainability_and_needs_training_mode(convnet):
    convnet.requires_grad_(False)
    assert len(ModuleValidator.validate(convnet)) == 3  # a frozen BatchNorm still mixes samples
    errors = ModuleValidator.validate(convnet.eval())  # as Opacus: eval mode is one more error
    assert len(errors) == 4 and "model.train()" in str(errors[0])


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(8), nn.BatchNorm3d(8), nn.SyncBatchNorm(8), nn.LazyBatchNorm2d()])
def test_every_batchnorm_kind_is_an_error(bn):
    (error,) = ModuleValidator.validate(bn)
    assert error.module_path == "" and str(error).startswith(f"<root> ({type(bn).__name__})")


def test_strict_raises_one_error_listing_all(convnet):
    with pytest.raises(UnsupportedModuleError) as info:
        ModuleValidator.validate(convnet, strict=True)
    assert issubclass(UnsupportableModuleError, UnsupportedModuleError)  # Opacus's hierarchy
    assert len(info.value.errors) == 3
    assert all(path in str(info.value) for path in ("features.3", "block.0.1", "head.2"))


def test_fix_replaces_batchnorm_and_keeps_the_model_running(convnet):
    before = state(convnet)
    fixed = ModuleValidator.fix(convnet)
    assert all(torch.equal(v, state(convnet)[k]) for k, v in before.items())  # input untouched
    assert ModuleValidator.is_valid(fixed)
    gn = fixed.features[3]
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels, gn.affine) == (32, 64, True)
    assert fixed.block[0][1].num_groups == 12 and not fixed.block[0][1].affine
    assert fixed.head[2].num_groups == 10
    assert all(isinstance(m, nn.BatchNorm2d) for m in (convnet.features[3], convnet.block[0][1]))
    x = torch.randn(4, 3, 8, 8)
    assert fixed(x).shape == convnet(x).shape == (4, 10)
    assert fixed.features[0].weight is not convnet.features[0].weight
    assert torch.equal(fixed.features[0].weight, convnet.features[0].weight)
    assert not any("running" in k for k in state(fixed))  # BatchNorm statistics dropped


@pytest.mark.parametrize("channels, groups", [(48, 24), (30, 30), (64, 32), (7, 7), (66, 22)])
def test_default_group_count_is_largest_divisor_up_to_32(channels, groups):
    assert ModuleValidator.fix(nn.BatchNorm2d(channels)).num_groups == groups


def test_num_groups_override_and_its_error(convnet):
    fixed = ModuleValidator.fix(convnet, num_groups=2)
    assert [fixed.features[3].num_groups, fixed.block[0][1].num_groups, fixed.head[2].num_groups] == [2, 2, 2]
    with pytest.raises(ValueError, match=r"num_groups=5 does not divide a BatchNorm's 64 channels"):
        ModuleValidator.fix(convnet, num_groups=5)


def test_fix_keeps_eps_frozenness_and_dtype():
    bn = nn.BatchNorm1d(6, eps=1e-3).double()
    bn.weight.requires_grad_(False)
    gn = ModuleValidator.fix(bn)
    assert gn.eps == 1e-3 and gn.weight.dtype == torch.float64
    assert not gn.weight.requires_grad and gn.bias.requires_grad


def test_replace_bn_with_in():
    fixed = ModuleValidator.fix(nn.Sequential(nn.BatchNorm2d(4)), replace_bn_with_in=True)
    assert isinstance(fixed[0], nn.InstanceNorm2d) and not fixed[0].track_running_stats
    with pytest.raises(ValueError, match="exclude each other"):
        ModuleValidator.fix(nn.BatchNorm2d(4), replace_bn_with_in=True, num_groups=2)
    with pytest.raises(ValueError, match="no InstanceNorm counterpart"):
        ModuleValidator.fix(nn.SyncBatchNorm(4), replace_bn_with_in=True)


def test_lazy_batchnorm_needs_a_forward_before_fix():
    with pytest.raises(ValueError, match="forward"):
        ModuleValidator.fix(nn.LazyBatchNorm1d())


def test_shared_batchnorm_gets_one_shared_replacement():
    bn = nn.BatchNorm1d(4)
    fixed = ModuleValidator.fix(nn.Sequential(bn, nn.ReLU(), bn))
    assert isinstance(fixed[0], nn.GroupNorm) and fixed[0] is fixed[2]


def test_instance_norm_running_stats_error_and_fix():
    tracked = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    with torch.no_grad():
        tracked.weight.uniform_()
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Sequential(tracked))
    (error,) = ModuleValidator.validate(model)
    assert error.module_path == "1.0" and "track_running_stats=False" in str(error)
    assert "ModuleValidator.fix(model)" in str(error)
    fixed = ModuleValidator.fix(model)
    untracked = fixed[1][0]
    assert not untracked.track_running_stats and untracked.running_mean is None and ModuleValidator.is_valid(fixed)
    assert torch.equal(untracked.weight, tracked.weight) and untracked.weight is not tracked.weight
    assert tracked.track_running_stats and tracked.running_mean is not None  # input untouched
    x = torch.randn(3, 2, 9)
    assert fixed.eval()(x).shape == model(x).shape == (3, 4, 7)
    already_fine = nn.InstanceNorm1d(4)
    assert ModuleValidator.is_valid(already_fine) and ModuleValidator.fix(already_fine).track_running_stats is False


@pytest.mark.parametrize(
    "layer, fix_hint",
    [
        (nn.Embedding(10, 4, max_norm=1.0), "drop max_norm"),
        (nn.Embedding(10, 4, scale_grad_by_freq=True), "scale_grad_by_freq=False"),
        (nn.EmbeddingBag(10, 4, mode="max"), "mode='sum'"),
    ],
)
def test_rule_configuration_errors_are_collected_without_fix(layer, fix_hint):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Identity(), layer))
    (error,) = ModuleValidator.validate(model)
    assert error.module_path == "1.1" and fix_hint in str(error)
    assert "ModuleValidator.fix" not in str(error)
    with pytest.raises(UnsupportedModuleError, match=fix_hint):
        ModuleValidator.fix_and_validate(model)


def test_recurrent_and_attention_layers_are_fixed_into_dp_layers():
    """Their fused forward hides per-sample gradients: errors naming the DP layer, which fix swaps in."""
    from fastdp.layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN

    model = nn.ModuleDict(
        {"lstm": nn.LSTM(4, 4), "gru": nn.GRU(4, 4), "rnn": nn.RNN(4, 4), "mha": nn.MultiheadAttention(4, 2)}
    )
    errors = ModuleValidator.validate(model)
    assert [e.module_path for e in errors] == ["lstm", "gru", "rnn", "mha"]
    assert "fastdp.layers.DPLSTM" in str(errors[0]) and "ModuleValidator.fix" in str(errors[0])
    fixed = ModuleValidator.fix(model)
    assert [type(m) for m in fixed.values()] == [DPLSTM, DPGRU, DPRNN, DPMultiheadAttention]
    assert ModuleValidator.validate(fixed) == []


def test_fix_and_validate_returns_a_valid_copy(convnet):
    original = copy.deepcopy(convnet)
    fixed = ModuleValidator.fix_and_validate(convnet, num_groups=2)
    assert ModuleValidator.is_valid(fixed) and fixed is not convnet
    assert str(original) == str(convnet)
