"""LayerNorm, GroupNorm, InstanceNorm and RMSNorm rules against microbatching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdp.engine.rules import get_rule
from .rule_testing import check_low_precision_norms, randint
from .rule_testing import check_empty_batch, check_rule

#: bf16 rounds x and the output grad by up to 2^-8 relative; per-sample grads summed over many
#: positions keep that relative size, so squared norms move by ~2^-7 at most. (Sums over a handful
#: of positions can cancel and lose more: there the error is relative to the summands, not the sum.)
BF16_NORM_RTOL = 1e-2


def random_eps(gen: torch.Generator) -> float:
    return (1e-5, 1e-3)[randint(gen, 0, 2)]


def random_sizes(gen: torch.Generator, max_dims: int) -> tuple:
    return tuple(randint(gen, 1, 5) for _ in range(randint(gen, 0, max_dims + 1)))


def random_input(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Off-centre inputs, so a wrong mean or variance shows, at scales from 1e-3 (variance below
    LayerNorm's eps=1e-5, so a misplaced eps shows) to 10."""
    scale = 10 ** (torch.rand((), generator=gen) * 4 - 3)
    return (torch.randn(shape, generator=gen) * 3 + 1) * scale


# Statistics are always over >= 2 elements: over one, x̂ is 0 up to torch's rounding noise.


def random_layer_norm(gen: torch.Generator) -> tuple:
    normalized_shape = (randint(gen, 2, 6),) + random_sizes(gen, 1)
    module = nn.LayerNorm(normalized_shape, eps=random_eps(gen), bias=bool(randint(gen, 0, 2)))
    return module, random_input(gen, randint(gen, 1, 5), *random_sizes(gen, 2), *normalized_shape)


def random_rms_norm(gen: torch.Generator) -> tuple:
    normalized_shape = (randint(gen, 2, 6),) + random_sizes(gen, 1)
    module = nn.RMSNorm(normalized_shape, eps=None if randint(gen, 0, 2) else 1e-3)
    return module, random_input(gen, randint(gen, 1, 5), *random_sizes(gen, 2), *normalized_shape)


def random_group_norm(gen: torch.Generator) -> tuple:
    num_groups = randint(gen, 1, 4)
    channels = num_groups * randint(gen, 2, 4)
    module = nn.GroupNorm(num_groups, channels, eps=random_eps(gen), affine=True)
    return module, random_input(gen, randint(gen, 1, 5), channels, *random_sizes(gen, 2))


def random_instance_norm(gen: torch.Generator) -> tuple:
    spatial_dims = randint(gen, 1, 4)
    channels = randint(gen, 1, 5)
    module_type = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 1]
    spatial = tuple(randint(gen, 2, 5) for _ in range(spatial_dims))
    module = module_type(channels, eps=random_eps(gen), affine=True)
    return module, random_input(gen, randint(gen, 1, 5), channels, *spatial)


MAKERS = [random_layer_norm, random_rms_norm, random_group_norm, random_instance_norm]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("make", MAKERS)
def test_norm_layer_matches_microbatch(make, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module, x = make(gen)
    with torch.no_grad():  # non-trivial affine parameters
        for param in module.parameters():
            param.normal_()
    check_rule(module, x)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("make", [random_layer_norm, random_group_norm, random_instance_norm])
def test_frozen_weight_or_bias(make, frozen):
    module, x = make(torch.Generator().manual_seed(1))
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros_like(module.weight))
    getattr(module, frozen).requires_grad_(False)
    check_rule(module, x)


def test_no_affine_parameters():
    module, x = nn.LayerNorm(6, elementwise_affine=False), torch.randn(3, 6)
    rule = get_rule(module)
    assert not rule.norm_sq(module, (x,), x).any()
    assert rule.clipped_grad(module, (x,), x, torch.ones(3)) == {}


@pytest.mark.parametrize("make", MAKERS)
def test_batch_of_one_and_empty_batch(make):
    module, x = make(torch.Generator().manual_seed(2))
    check_rule(module, x[:1])
    if not isinstance(module, nn.modules.instancenorm._InstanceNorm):  # torch's own forward fails on B = 0
        check_empty_batch(module, x)


@pytest.mark.parametrize(
    "module, shape",
    [
        (nn.LayerNorm(64), (4, 16, 64)),
        (nn.RMSNorm(64), (4, 16, 64)),
        (nn.GroupNorm(4, 16), (4, 16, 8, 8)),
        (nn.InstanceNorm2d(8, affine=True), (4, 8, 8, 8)),
    ],
)
def test_bf16_norms_close_to_fp32(module, shape):
    gen = torch.Generator().manual_seed(3)
    x, grad_output = random_input(gen, *shape), torch.randn(shape, generator=gen)
    check_low_precision_norms(module, (x,), grad_output, torch.bfloat16, BF16_NORM_RTOL)


@pytest.mark.parametrize("module_type", [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d])
def test_instance_norm_running_stats_rejected(module_type):
    module = module_type(4, affine=True, track_running_stats=True)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        get_rule(module).check(module)
