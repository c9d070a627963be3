"""fastdp.layers against torch: DPLSTM/DPGRU/DPRNN/DPMultiheadAttention give nn's outputs, hidden
states and gradients with the same weights, for every constructor option; packed sequences;
state_dicts load both ways; ModuleValidator.fix swaps them in."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from fastdp import ModuleValidator
from fastdp.layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN, DPRNNBase

TOL = {"rtol": 1e-5, "atol": 1e-6}
INPUT, HIDDEN = 3, 5

RECURRENT = {
    "lstm": (nn.LSTM, DPLSTM, {}),
    "gru": (nn.GRU, DPGRU, {}),
    "rnn_tanh": (nn.RNN, DPRNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, DPRNN, {"nonlinearity": "relu"}),
}
OPTIONS = [
    {},
    {"num_layers": 2},
    {"bias": False},
    {"batch_first": True},
    {"bidirectional": True},
    {"num_layers": 3, "dropout": 0.5},  # compared in eval mode, where dropout is off (as in torch)
    {"num_layers": 2, "bidirectional": True, "batch_first": True, "bias": False},
]
LSTM_PROJECTION_OPTIONS = [{"proj_size": 2}, {"proj_size": 3, "num_layers": 2, "bidirectional": True, "batch_first": True}]


def twins(kind: str, options: dict, seed: int = 0):
    """(torch layer, DP layer) with the torch layer's weights."""
    torch_type, dp_type, extra = RECURRENT[kind]
    torch.manual_seed(seed)
    reference = torch_type(INPUT, HIDDEN, **extra, **options)
    layer = dp_type(INPUT, HIDDEN, **extra, **options)
    layer.load_state_dict(reference.state_dict())
    if options.get("dropout"):
        reference.eval(), layer.eval()
    return reference, layer


def flat(outputs):
    """Every tensor in a (possibly nested) layer output or input; None and non-tensors left out."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, PackedSequence):
        return [outputs.data]
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in flat(item)]
    return []


def assert_same_forward_and_backward(reference, layer, make_inputs):
    """Equal outputs, and equal gradients of a random function of them for the parameters and inputs."""
    ref_inputs, inputs = make_inputs(), make_inputs()
    expected, actual = flat(reference(*ref_inputs)), flat(layer(*inputs))
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, **TOL)
    weights = [torch.randn_like(e) for e in expected]
    sum(((e * w).sum() for e, w in zip(expected, weights))).backward()
    sum(((a * w).sum() for a, w in zip(actual, weights))).backward()
    for (name, p), (dp_name, q) in zip(reference.named_parameters(), layer.named_parameters()):
        assert name == dp_name
        torch.testing.assert_close(q.grad, p.grad, **TOL)
    for e, a in zip(flat(ref_inputs), flat(inputs)):
        if e.requires_grad:
            assert e.grad is not None and a.grad is not None
            torch.testing.assert_close(a.grad, e.grad, **TOL)


def sequence_input(options, batch=4, steps=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, steps, INPUT) if options.get("batch_first") else (steps, batch, INPUT)
    return torch.randn(shape, generator=gen).requires_grad_()


def initial_state(kind, options, batch=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    count = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    h0 = torch.randn(count, batch, options.get("proj_size") or HIDDEN, generator=gen).requires_grad_()
    if kind != "lstm":
        return h0
    return h0, torch.randn(count, batch, HIDDEN, generator=gen).requires_grad_()


CASES = [(kind, options) for kind in RECURRENT for options in OPTIONS] + [("lstm", o) for o in LSTM_PROJECTION_OPTIONS]


@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}-{o}" for k, o in CASES])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_layer_matches_torch(kind, options, with_state):
    reference, layer = twins(kind, options)
    if with_state:
        make_inputs = lambda: (sequence_input(options), initial_state(kind, options))  # noqa: E731
    else:
        make_inputs = lambda: (sequence_input(options),)  # noqa: E731
    assert_same_forward_and_backward(reference, layer, make_inputs)


@pytest.mark.parametrize("kind", list(RECURRENT))
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}], ids=["plain", "2layers-bidir"])
def test_packed_sequences_match_torch(kind, enforce_sorted, options):
    """Different lengths (ties included): same packed output and indices, h_n at each sample's last step."""
    reference, layer = twins(kind, options)
    lengths = [6, 3, 6, 1, 4]
    if enforce_sorted:
        lengths = sorted(lengths, reverse=True)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(n, INPUT, generator=gen) for n in lengths]

    def make_inputs():
        packed = pack_sequence([d.clone().requires_grad_() for d in data], enforce_sorted=enforce_sorted)
        packed.data.retain_grad()  # compared below like any input gradient
        return (packed, initial_state(kind, options, batch=len(lengths)))

    assert_same_forward_and_backward(reference, layer, make_inputs)
    packed = make_inputs()[0]
    expected, actual = reference(packed)[0], layer(packed)[0]
    assert torch.equal(actual.batch_sizes, expected.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        e, a = getattr(expected, name), getattr(actual, name)
        assert (e is None and a is None) or torch.equal(a, e)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_relu"])
def test_unbatched_input_matches_torch(kind):
    options = {"num_layers": 2, "bidirectional": True}
    reference, layer = twins(kind, options)
    state = initial_state(kind, options, batch=1)
    state = tuple(s.detach()[:, 0] for s in state) if kind == "lstm" else state.detach()[:, 0]
    assert_same_forward_and_backward(
        reference, layer, lambda: (torch.randn(5, INPUT, generator=torch.Generator().manual_seed(4)), state)
    )


@pytest.mark.parametrize("kind", list(RECURRENT))
def test_dropout_one_in_training_matches_torch(kind):
    """dropout=1 zeroes every inter-layer activation: deterministic, so comparable in train mode."""
    torch_type, dp_type, extra = RECURRENT[kind]
    torch.manual_seed(0)
    reference = torch_type(INPUT, HIDDEN, num_layers=2, dropout=1.0, **extra)
    layer = dp_type(INPUT, HIDDEN, num_layers=2, dropout=1.0, **extra)
    layer.load_state_dict(reference.state_dict())
    x = sequence_input({})
    torch.testing.assert_close(layer(x)[0], reference(x)[0], **TOL)
    layer.eval()
    assert not torch.allclose(layer(x)[0], reference(x)[0])  # the reference still drops: eval differs


@pytest.mark.parametrize("kind,options", [("lstm", {"proj_size": 2, "num_layers": 2, "bidirectional": True}),
                                          ("gru", {"bias": False}), ("rnn_relu", {"num_layers": 2})])
def test_state_dict_loads_both_ways(kind, options):
    torch_type, dp_type, extra = RECURRENT[kind]
    torch.manual_seed(0)
    reference, layer = torch_type(INPUT, HIDDEN, **extra, **options), dp_type(INPUT, HIDDEN, **extra, **options)
    assert list(layer.state_dict()) == list(reference.state_dict())
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    layer.load_state_dict(reference.state_dict())
    back = torch_type(INPUT, HIDDEN, **extra, **options)
    back.load_state_dict(layer.state_dict())
    x = sequence_input(options)
    torch.testing.assert_close(back(x)[0], reference(x)[0], **TOL)


def test_default_initialisation_is_torchs():
    """Same bound, same parameter order: with the same seed, the same weights."""
    torch.manual_seed(7)
    reference = nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=2)
    torch.manual_seed(7)
    layer = DPLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=2)
    for (_, p), (_, q) in zip(reference.named_parameters(), layer.named_parameters()):
        assert torch.equal(p, q)


# -- DPMultiheadAttention ----------------------------------------------------------------------------
EMBED, HEADS = 6, 2
MHA_OPTIONS = [
    {},
    {"batch_first": True},
    {"bias": False},
    {"add_bias_kv": True},
    {"add_zero_attn": True},
    {"kdim": 4, "vdim": 5},
    {"add_bias_kv": True, "add_zero_attn": True, "kdim": 4, "vdim": 5, "batch_first": True},
    {"dropout": 0.5},  # compared in eval mode
]


def mha_twins(options, seed=0):
    torch.manual_seed(seed)
    reference = nn.MultiheadAttention(EMBED, HEADS, **options)
    layer = DPMultiheadAttention(EMBED, HEADS, **options)
    layer.load_state_dict(reference.state_dict())
    if options.get("dropout"):
        reference.eval(), layer.eval()
    return reference, layer


def mha_inputs(options, pattern, batch=3, tgt=4, src=5, seed=5):
    """(query, key, value) batch-first or not; ``pattern``: self (one tensor), kv (key is value), cross."""
    gen = torch.Generator().manual_seed(seed)
    kdim, vdim = options.get("kdim", EMBED), options.get("vdim", EMBED)

    def make(length, dim):
        shape = (batch, length, dim) if options.get("batch_first") else (length, batch, dim)
        return torch.randn(shape, generator=gen).requires_grad_()

    if pattern == "self":
        x = make(tgt, EMBED)
        return x, x, x
    query = make(tgt, EMBED)
    if pattern == "kv":
        key = make(src, kdim)
        return query, key, key
    return query, make(src, kdim), make(src, vdim)


def mha_patterns(options):
    if options.get("kdim", EMBED) != EMBED or options.get("vdim", EMBED) != EMBED:
        return ["cross"]
    return ["self", "kv", "cross"]


MHA_CASES = [(o, p) for o in MHA_OPTIONS for p in mha_patterns(o)]


@pytest.mark.parametrize("options,pattern", MHA_CASES, ids=[f"{o}-{p}" for o, p in MHA_CASES])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_multihead_attention_matches_torch(options, pattern, need_weights, average):
    reference, layer = mha_twins(options)
    assert_same_forward_and_backward(
        reference, layer,
        lambda: (*mha_inputs(options, pattern), None, need_weights, None, average),
    )


def _masks(batch, tgt, src, kind, gen):
    padding = torch.zeros(batch, src, dtype=torch.bool)
    padding[0, -2:] = True  # sample 0 ignores its last two keys
    if kind == "bool":
        attn = torch.rand(tgt, src, generator=gen) < 0.3
        attn[:, 0] = False  # every query keeps a key
        return padding, attn
    float_padding = torch.zeros(batch, src).masked_fill(padding, -1e4)
    return float_padding, torch.randn(batch * HEADS, tgt, src, generator=gen)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True}], ids=["plain", "extra-keys"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_masks_match_torch(mask_kind, options, need_weights):
    reference, layer = mha_twins(options)
    padding, attn = _masks(3, 4, 5, mask_kind, torch.Generator().manual_seed(6))
    assert_same_forward_and_backward(
        reference, layer,
        lambda: (*mha_inputs(options, "kv"), padding, need_weights, attn),
    )


def test_multihead_attention_causal_hint_and_unbatched_match_torch():
    reference, layer = mha_twins({})
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    for need_weights in (True, False):
        assert_same_forward_and_backward(
            reference, layer, lambda: (*mha_inputs({}, "self", tgt=4), None, need_weights, causal, True, True)
        )
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, EMBED, generator=gen)
    kv = torch.randn(5, EMBED, generator=gen)
    padding = torch.tensor([False, False, True, False, False])
    assert_same_forward_and_backward(reference, layer, lambda: (x, kv, kv, padding))


@pytest.mark.parametrize("options", [{"kdim": 4, "vdim": 5, "add_bias_kv": True}, {"bias": False, "batch_first": True}])
def test_multihead_attention_state_dict_loads_both_ways(options):
    torch.manual_seed(0)
    reference, layer = nn.MultiheadAttention(EMBED, HEADS, **options), DPMultiheadAttention(EMBED, HEADS, **options)
    assert list(layer.state_dict()) == list(reference.state_dict())
    layer.load_state_dict(reference.state_dict())
    back = nn.MultiheadAttention(EMBED, HEADS, **options)
    back.load_state_dict(layer.state_dict())
    query, key, value = mha_inputs(options, "cross")
    torch.testing.assert_close(back(query, key, value)[0], reference(query, key, value)[0], **TOL)


# -- ModuleValidator.fix and bad input ---------------------------------------------------------------
def test_fix_swaps_in_dp_layers_with_the_same_weights_and_trainability():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "lstm": nn.LSTM(INPUT, HIDDEN, num_layers=2, proj_size=2, batch_first=True, bidirectional=True),
        "gru": nn.GRU(INPUT, HIDDEN, bias=False), "rnn": nn.RNN(INPUT, HIDDEN, nonlinearity="relu"),
        "mha": nn.MultiheadAttention(EMBED, HEADS, add_bias_kv=True, kdim=4, vdim=5),
    })
    model["gru"].weight_hh_l0.requires_grad_(False)
    model["mha"].eval()
    fixed = ModuleValidator.fix(model)
    assert [type(m) for m in fixed.values()] == [DPLSTM, DPGRU, DPRNN, DPMultiheadAttention]
    assert ModuleValidator.validate(fixed) == [] and len(ModuleValidator.validate(model)) == 4
    assert not fixed["gru"].weight_hh_l0.requires_grad and fixed["gru"].weight_ih_l0.requires_grad
    assert not fixed["mha"].training and fixed["lstm"].training
    assert fixed["rnn"].nonlinearity == "relu" and fixed["lstm"].proj_size == 2 and fixed["lstm"].batch_first
    x = sequence_input({"batch_first": True})
    torch.testing.assert_close(fixed["lstm"](x)[0], model["lstm"](x)[0], **TOL)
    query, key, value = mha_inputs({"kdim": 4, "vdim": 5}, "cross")
    torch.testing.assert_close(fixed["mha"](query, key, value)[0], model["mha"](query, key, value)[0], **TOL)


def test_frozen_torch_recurrent_layer_is_not_an_error():
    assert ModuleValidator.validate(nn.LSTM(INPUT, HIDDEN).requires_grad_(False)) == []


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: DPLSTM(3, 4, proj_size=4), "proj_size"),
        (lambda: DPRNN(3, 4, nonlinearity="sigmoid"), "nonlinearity"),
        (lambda: DPRNNBase("GRU", 3, 4, proj_size=1), "only supported by DPLSTM"),
        (lambda: DPLSTM(3, 0), "hidden_size"),
        (lambda: DPGRU(3, 4, dropout=1.5), "dropout"),
        (lambda: DPMultiheadAttention(6, 4), "divisible"),
        (lambda: DPMultiheadAttention(6, 2, kdim=0), "kdim"),
    ],
)
def test_bad_configuration_is_a_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs_are_value_errors():
    lstm = DPLSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="h_0 must have shape"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="tuple"):
        lstm(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="sequence length 0"):
        lstm(torch.randn(0, 2, 3))
    mha = DPMultiheadAttention(6, 2)
    x = torch.randn(4, 2, 6)
    with pytest.raises(ValueError, match="is_causal"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_cpu_run_logs_the_pure_torch_path(caplog):
    import fastdp.layers.rnn as rnn_module

    rnn_module._logged_backends.clear()
    with caplog.at_level(logging.INFO, logger="fastdp.layers.rnn"):
        DPGRU(3, 4)(torch.randn(2, 1, 3))
    assert "GRU cells on cpu run the pure-torch path" in caplog.text


def test_deepcopy_and_repr():
    layer = DPLSTM(3, 4, num_layers=2, batch_first=True, proj_size=2)
    assert repr(layer) == repr(nn.LSTM(3, 4, num_layers=2, batch_first=True, proj_size=2)).replace("LSTM", "DPLSTM")
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 3, 3)
    torch.testing.assert_close(clone(x)[0], layer(x)[0])
