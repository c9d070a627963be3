"""ConvRule and the N-d unfold against microbatching / F.unfold, over every conv option."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fastdp.ops.conv as conv_ops
import fastdp.ops.linear as linear_ops
from fastdp.engine.rules import get_rule
from fastdp.engine.rules.conv import ConvRule
from fastdp.ops.conv import unfold

from .rule_testing import check_empty_batch, check_rule, norm_method  # noqa: F401  (fixture)


def case(cls, input_shape, in_channels, out_channels, kernel_size, **options):
    """(module class, constructor kwargs, input shape)."""
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size, **options)
    return cls, kwargs, input_shape


# Together: every stride / padding (int, tuple, "same" incl. even kernels, "valid") / padding_mode /
# dilation / groups (incl. depthwise) / bias option, in 1d, 2d and 3d.
CONFIGS = [
    case(nn.Conv1d, (3, 3, 10), 3, 4, 3),
    case(nn.Conv1d, (2, 3, 9), 3, 4, 3, stride=2, padding=1, bias=False),
    case(nn.Conv1d, (2, 2, 11), 2, 3, 3, padding="same", dilation=2, padding_mode="reflect"),
    case(nn.Conv1d, (2, 3, 7), 3, 6, 2, groups=3, padding=2, padding_mode="circular"),
    case(nn.Conv1d, (2, 2, 8), 2, 2, 4, padding="valid", padding_mode="replicate"),
    case(nn.Conv2d, (3, 3, 6, 7), 3, 5, 3),
    case(nn.Conv2d, (2, 2, 9, 6), 2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    case(nn.Conv2d, (2, 2, 7, 9), 2, 3, (2, 3), padding="same", dilation=(1, 3), padding_mode="replicate"),
    case(nn.Conv2d, (2, 4, 6, 6), 4, 4, 3, groups=4, padding=1, padding_mode="reflect", bias=False),
    case(nn.Conv2d, (2, 4, 7, 8), 4, 6, 3, groups=2, stride=2, padding=(1, 2), padding_mode="circular"),
    case(nn.Conv2d, (2, 3, 5, 4), 3, 8, 1),
    case(nn.Conv3d, (2, 2, 4, 5, 3), 2, 3, 2),
    case(nn.Conv3d, (2, 4, 4, 7, 5), 4, 2, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2),
         groups=2),
    case(nn.Conv3d, (2, 2, 4, 4, 5), 2, 2, 3, padding="same", padding_mode="replicate"),
    case(nn.Conv3d, (2, 2, 4, 5, 4), 2, 4, 3, groups=2, padding=1, padding_mode="reflect"),
    case(nn.Conv3d, (2, 1, 3, 4, 4), 1, 2, (1, 2, 2), padding=(0, 1, 1), padding_mode="circular", bias=False),
]


def config_id(config):
    cls, kwargs, shape = config
    options = ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("in_channels", "out_channels"))
    return f"{cls.__name__}({options})"


def make(config, seed=0):
    cls, kwargs, shape = config
    torch.manual_seed(seed)
    return cls(**kwargs), torch.randn(shape)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_microbatching(config, norm_method):
    check_rule(*make(config), bilinear=True)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("config", CONFIGS[::2], ids=config_id)
def test_in_place_clipped_sum_in_blocks_of_output_channels(config, monkeypatch):
    """add_clipped_grad returns a large weight's sum a quarter of its output channels at a time (forced here
    for small layers): the same sums as microbatching, added to what the buffer held."""
    monkeypatch.setattr(conv_ops, "MIN_BLOCKED_WEIGHT_NUMEL", 0)
    calls = []
    original = conv_ops.conv_weight_clipped_grad
    monkeypatch.setattr(conv_ops, "conv_weight_clipped_grad", lambda *a, **k: calls.append(a[1].shape[1]) or original(*a, **k))
    module, x = make(config)
    check_rule(module, x, bilinear=True)
    if module.groups == 1 and module.out_channels > 1:  # the in-place sum, in blocks (clipped_grad: one call)
        assert len(calls) > 2 and sum(calls[1:]) == module.out_channels


@pytest.mark.parametrize("config", CONFIGS[::3], ids=config_id)
def test_batch_of_one(config):
    module, x = make(config)
    check_rule(module, x[:1], bilinear=True)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 3),
    channels_per_group=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.tuples(st.integers(3, 7), st.integers(3, 7)),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_conv2d_with_cost_model(
    batch, groups, channels_per_group, kernel, stride, dilation, padding, padding_mode, size, bias, seed
):
    assume(all(pad < dim for pad, dim in zip(padding, size)))  # reflect / circular need pad < size
    assume(all(dim + 2 * pad >= dil * (k - 1) + 1 for dim, pad, dil, k in zip(size, padding, dilation, kernel)))
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        groups * channels_per_group[0], groups * channels_per_group[1], kernel, stride, padding, dilation,
        groups, bias, padding_mode,
    )
    check_rule(conv, torch.randn(batch, groups * channels_per_group[0], *size), bilinear=True)


@settings(max_examples=30, deadline=None)
@given(
    channels=st.integers(1, 3),
    size=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_unfold_matches_F_unfold(channels, size, kernel, stride, dilation):
    assume(all(dim >= dil * (k - 1) + 1 for dim, dil, k in zip(size, dilation, kernel)))
    x = torch.randn(2, channels, *size)
    expected = F.unfold(x, kernel, dilation=dilation, stride=stride).mT
    torch.testing.assert_close(unfold(x, kernel, dilation, stride)[:, 0], expected, rtol=0, atol=0)


def test_unfold_groups_split_the_channel_blocks():
    x = torch.randn(2, 6, 5, 5)
    whole = unfold(x, (3, 2), (1, 2), (2, 1))[:, 0]
    grouped = unfold(x, (3, 2), (1, 2), (2, 1), groups=3)
    assert grouped.shape == (2, 3, whole.shape[1], 2 * 3 * 2)
    torch.testing.assert_close(grouped, whole.unflatten(2, (3, 12)).transpose(1, 2), rtol=0, atol=0)


def test_chunked_norms_equal_unchunked(norm_method, monkeypatch):
    module, x = make(CONFIGS[9])
    grad_output = torch.randn_like(module(x))
    whole = get_rule(module).norm_sq(module, (x,), grad_output)
    monkeypatch.setattr(linear_ops, "CHUNK_NUMEL", 1)  # one sample per chunk
    torch.testing.assert_close(get_rule(module).norm_sq(module, (x,), grad_output), whole, rtol=1e-6, atol=0)


def test_channels_last(norm_method):
    module, x = make(CONFIGS[9])
    check_rule(module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last), bilinear=True)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("config", [CONFIGS[3], CONFIGS[9], CONFIGS[12]], ids=config_id)
def test_frozen_parameter(config, frozen, norm_method):
    module, x = make(config)
    getattr(module, frozen).requires_grad_(False)
    check_rule(module, x, bilinear=True)


@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[9], CONFIGS[14]], ids=config_id)
def test_empty_batch(config):
    check_empty_batch(*make(config))


@pytest.mark.parametrize("config", [CONFIGS[5], CONFIGS[8]], ids=config_id)
def test_bf16_norms_are_fp32_and_close_to_fp32_result(config):
    """bf16 conv and activations: fp32 norms within 3e-2 relative of the fp32 conv's (input rounding only)."""
    module, x = make(config)
    grad_output = torch.randn_like(module(x))
    rule = get_rule(module)
    expected = rule.norm_sq(module, (x,), grad_output)
    module16 = module.bfloat16()
    norms = rule.norm_sq(module16, (x.bfloat16(),), grad_output.bfloat16())
    assert norms.dtype == torch.float64  # upper bounds (fastdp.ops.rounding)
    torch.testing.assert_close(norms, expected, rtol=3e-2, atol=0)
    clipped = rule.clipped_grad(module16, (x.bfloat16(),), grad_output.bfloat16(), torch.rand(x.shape[0]))
    assert {g.dtype for g in clipped.values()} == {torch.bfloat16}


def test_registration_and_check():
    assert all(isinstance(get_rule(cls(2, 2, 1)), ConvRule) for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    assert get_rule(nn.ConvTranspose2d(2, 2, 1)) is None
    conv = nn.Conv2d(2, 2, 3)
    conv.padding_mode = "symmetric"
    with pytest.raises(ValueError, match="padding_mode='symmetric'"):
        get_rule(conv).check(conv)
