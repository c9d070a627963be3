"""DP recurrent and attention layers under the engine, against microbatching (one sample at a time
through plain autograd): per-sample norms, clipped sums, hooks-mode per-sample gradients; both
batch layouts, packed sequences, frozen and shared weights, per-layer clipping. Also the rule
itself on hand-made capture points, and the capture shape: one call per layer and direction."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from fastdp.engine.clipping import PerLayerClipping
from fastdp.engine.grad_sample_module import GradSampleModule
from fastdp.engine.rules import get_rule
from fastdp.engine.rules.rnn import SEQUENCE_LINEAR_RULE, SequenceLinear, WeightTerm
from fastdp.layers import DPGRU, DPLSTM, DPMultiheadAttention, DPRNN

from .rule_testing import BOUND_RTOL, assert_norm_bounds, assert_rel_close, norm_method  # noqa: F401  (fixture)

BATCH, STEPS, INPUT = 4, 5, 3


def microbatch(model: nn.Module, loss_of, batch: int):
    """Per-sample gradients {name: [B, *p.shape]} of ``loss_of(model, [i])``, one sample at a time."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(batch):
        grads = torch.autograd.grad(loss_of(model, [i]), list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)])
    return {n: torch.stack([row[k] for row in rows]) for k, n in enumerate(params)}


def check_engine(model, loss_of, batch=BATCH, *, mode="bk", batch_first=True, reduction="sum", rtol=1e-5):
    """The engine's per-sample norms, clipped sums (random factors) and, in hooks mode, p.grad_sample."""
    expected = microbatch(model, loss_of, batch)
    expected_norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in expected.values()))
    gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction=reduction, mode=mode)
    loss = loss_of(gsm, list(range(batch)))
    (loss / batch if reduction == "mean" else loss).backward()
    assert_norm_bounds(gsm.per_sample_norms, expected_norms, rtol=max(rtol, BOUND_RTOL))
    factors = torch.rand(batch, generator=torch.Generator().manual_seed(9))
    gsm.accumulate_clipped_grads(factors)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None
            continue
        assert_rel_close(param.grad, torch.einsum("b,b...->...", factors.double(), expected[name].double()), rtol)
        if mode != "bk":
            assert_rel_close(param.grad_sample, expected[name], rtol)
    return gsm


class RecurrentNet(nn.Module):
    """A DP recurrent layer, then a Linear over its outputs (layout as the layer's)."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(directions * (getattr(rnn, "proj_size", 0) or rnn.hidden_size), 2)

    def forward(self, x, hx=None):
        output, state = self.rnn(x, hx)
        return self.head(output), state


def recurrent_loss(batch_first, with_state=False, seed=0):
    """``loss_of(model, rows)``: a fixed nonlinear function of each sample's outputs and final state."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, STEPS, INPUT, generator=gen)
    out_weights = torch.randn(BATCH, STEPS, 2, generator=gen)

    def loss_of(model, rows):
        inputs = x[rows] if batch_first else x[rows].transpose(0, 1)
        rnn = model._module.rnn if isinstance(model, GradSampleModule) else model.rnn
        hx = None
        if with_state:
            count = rnn.num_layers * (2 if rnn.bidirectional else 1)
            state_gen = torch.Generator().manual_seed(seed + 1)
            h0 = torch.randn(count, BATCH, getattr(rnn, "proj_size", 0) or rnn.hidden_size, generator=state_gen)[:, rows]
            hx = (h0, torch.randn(count, BATCH, rnn.hidden_size, generator=state_gen)[:, rows]) if isinstance(rnn, DPLSTM) else h0
        output, state = model(inputs, hx)
        output = output if batch_first else output.transpose(0, 1)
        h_n = state[0] if isinstance(state, tuple) else state
        loss = (torch.tanh(output) * out_weights[rows]).sum() + h_n.square().sum()
        return loss + state[1].square().sum() if isinstance(state, tuple) else loss

    return loss_of


RECURRENT = {
    "lstm-proj-2layers-bidir": lambda bf: DPLSTM(INPUT, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=bf),
    "lstm-nobias": lambda bf: DPLSTM(INPUT, 4, bias=False, batch_first=bf),
    "gru-2layers-bidir": lambda bf: DPGRU(INPUT, 4, num_layers=2, bidirectional=True, batch_first=bf),
    "rnn-relu": lambda bf: DPRNN(INPUT, 4, nonlinearity="relu", batch_first=bf),
}


@pytest.mark.parametrize("name", list(RECURRENT))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_recurrent_layers_match_microbatching(name, batch_first, mode, norm_method):
    torch.manual_seed(0)
    model = RecurrentNet(RECURRENT[name](batch_first))
    check_engine(model, recurrent_loss(batch_first), mode=mode, batch_first=batch_first)


@pytest.mark.parametrize("name", ["lstm-proj-2layers-bidir", "gru-2layers-bidir"])
def test_initial_state_and_mean_loss(name):
    torch.manual_seed(0)
    model = RecurrentNet(RECURRENT[name](True))
    check_engine(model, recurrent_loss(True, with_state=True), reduction="mean")


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_packed_sequences_match_microbatching(kind, mode, norm_method):
    """Each sample packed alone in the reference; padded steps must add nothing to any gradient."""
    torch.manual_seed(0)
    layer = {"lstm": lambda: DPLSTM(INPUT, 4, num_layers=2, bidirectional=True, proj_size=3),
             "gru": lambda: DPGRU(INPUT, 4, bidirectional=True), "rnn": lambda: DPRNN(INPUT, 4, num_layers=2)}[kind]()
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 2, 5, 1]
    data = [torch.randn(n, INPUT, generator=gen) for n in lengths]
    weights = torch.randn(len(lengths), max(lengths), 2, generator=gen)
    for i, n in enumerate(lengths):
        weights[i, n:] = 0  # the head sees padded positions of the batch, not of a sample alone

    def loss_of(model, rows):
        output, state = model(pack_sequence([data[i] for i in rows], enforce_sorted=False))
        h_n = state[0] if isinstance(state, tuple) else state
        return (torch.tanh(output) * weights[rows, : output.shape[1]]).sum() + h_n.square().sum()

    check_engine(PackedNet(layer), loss_of, batch=len(lengths), mode=mode)


class PackedNet(RecurrentNet):
    """Packed sequences in; the Linear sees the padded outputs [B, T, ·] (the samples' order)."""

    def forward(self, packed):
        output, state = self.rnn(packed)
        return self.head(pad_packed_sequence(output, batch_first=True)[0]), state


# -- attention ---------------------------------------------------------------------------------------
MHA = {
    "self": ({"batch_first": True}, "self"),
    "cross-kvdims-extra-keys": ({"kdim": 4, "vdim": 5, "add_bias_kv": True, "add_zero_attn": True}, "cross"),
    "kv-masks": ({"add_bias_kv": True}, "kv-masks"),
    "nobias-no-weights": ({"bias": False, "batch_first": True}, "cross-no-weights"),
}


def attention_loss(options, pattern, seed=0):
    gen = torch.Generator().manual_seed(seed)
    embed, tgt, src = 6, 3, 5
    query = torch.randn(BATCH, tgt, embed, generator=gen)
    key = torch.randn(BATCH, src, options.get("kdim", embed), generator=gen)
    value = torch.randn(BATCH, src, options.get("vdim", embed), generator=gen)
    padding = torch.zeros(BATCH, src, dtype=torch.bool)
    padding[1, -2:] = True
    attn_mask = torch.randn(tgt, src, generator=gen)
    out_weights = torch.randn(BATCH, tgt, embed, generator=gen)
    batch_first = options.get("batch_first", False)

    def loss_of(model, rows):
        layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
        q, k, v = layout(query[rows]), layout(key[rows]), layout(value[rows])
        if pattern == "self":
            output, weights = model(q, q, q)
        elif pattern == "kv-masks":
            output, weights = model(q, k, k, key_padding_mask=padding[rows], attn_mask=attn_mask)
        else:
            output, weights = model(q, k, v, need_weights=pattern != "cross-no-weights")
        loss = (torch.tanh(layout(output)) * out_weights[rows]).sum()
        return loss if weights is None else loss + weights.square().sum()

    return loss_of


@pytest.mark.parametrize("name", list(MHA))
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_attention_matches_microbatching(name, mode, norm_method):
    options, pattern = MHA[name]
    torch.manual_seed(0)
    model = DPMultiheadAttention(6, 2, **options)
    check_engine(model, attention_loss(options, pattern), mode=mode, batch_first=options.get("batch_first", False))


class AttentionInModelLayout(nn.Module):
    """Linear, self-attention, Linear in a model of layout ``model_batch_first`` around an attention
    layer of its own layout (the transposes a user writes between them)."""

    def __init__(self, model_batch_first: bool, layer_batch_first: bool):
        super().__init__()
        self.embed, self.head = nn.Linear(INPUT, 6), nn.Linear(6, 2)
        self.attention = DPMultiheadAttention(6, 2, batch_first=layer_batch_first)
        self.swap = model_batch_first != layer_batch_first

    def forward(self, x):
        h = self.embed(x)
        h = h.transpose(0, 1) if self.swap else h
        h, _ = self.attention(h, h, h)
        return self.head(h.transpose(0, 1) if self.swap else h)


@pytest.mark.parametrize("steps", [STEPS, BATCH], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("layer_batch_first", [True, False])
@pytest.mark.parametrize("model_batch_first", [True, False])
def test_attention_layout_need_not_match_the_models(model_batch_first, layer_batch_first, steps):
    """out_proj runs batch-first inside the layer, so a sequence-first attention layer in a batch-first
    model (and the reverse) is clipped per sample; with T == B a mix-up of the two would pass silently."""
    torch.manual_seed(0)
    model = AttentionInModelLayout(model_batch_first, layer_batch_first)
    x = torch.randn(BATCH, steps, INPUT, generator=torch.Generator().manual_seed(3))
    target = torch.randn(BATCH, steps, 2, generator=torch.Generator().manual_seed(4))

    def loss_of(net, rows):
        inputs = x[rows] if model_batch_first else x[rows].transpose(0, 1)
        output = net(inputs)
        return (torch.tanh(output if model_batch_first else output.transpose(0, 1)) * target[rows]).sum()

    check_engine(model, loss_of, batch_first=model_batch_first)


# -- engine details ----------------------------------------------------------------------------------
def test_frozen_parameters_get_nothing():
    torch.manual_seed(0)
    model = RecurrentNet(DPLSTM(INPUT, 4, num_layers=2, proj_size=2, batch_first=True))
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l1.requires_grad_(False)
    model.rnn.weight_hr_l1.requires_grad_(False)
    check_engine(model, recurrent_loss(True), batch_first=True)
    torch.manual_seed(0)
    attention = DPMultiheadAttention(6, 2, batch_first=True, add_bias_kv=True)
    attention.in_proj_weight.requires_grad_(False)
    attention.bias_v.requires_grad_(False)
    check_engine(attention, attention_loss({"batch_first": True}, "self"))


def test_layer_called_twice_sums_its_uses():
    """Weight sharing: the engine materialises and sums the two calls' per-sample gradients."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = DPGRU(INPUT, INPUT, batch_first=True)

        def forward(self, x, hx=None):
            return self.rnn(self.rnn(x)[0])

    def loss_of(model, rows):
        output, h_n = model(x[rows])
        return torch.tanh(output).sum() + h_n.square().sum()

    torch.manual_seed(0)
    x = torch.randn(BATCH, STEPS, INPUT, generator=torch.Generator().manual_seed(0))
    check_engine(Twice(), loss_of)


def test_per_layer_clipping_uses_each_parameters_own_norm():
    torch.manual_seed(0)
    model = RecurrentNet(DPLSTM(INPUT, 4, bidirectional=True, batch_first=True))
    loss_of = recurrent_loss(True)
    expected = microbatch(model, loss_of, BATCH)
    bounds = {n: 0.05 * (k + 1) for k, n in enumerate(expected)}
    params = dict(model.named_parameters())
    gsm = GradSampleModule(model, loss_reduction="sum",
                           clipping=PerLayerClipping({id(params[n]): b for n, b in bounds.items()}))
    loss_of(gsm, list(range(BATCH))).backward()
    for name, grads in expected.items():
        factors = (bounds[name] / (grads.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        assert_rel_close(params[name].grad, torch.einsum("b,b...->...", factors, grads), 1e-5)


def test_no_non_private_weight_gradient_and_one_capture_per_layer_direction(monkeypatch):
    """Autograd forms none of the layer's weight gradients, and the number of captured calls does
    not depend on the sequence length: no hook, no tensor per time step."""
    counts = []
    original = GradSampleModule._on_grad_output

    def counting(self, call, grad_output):
        counts[-1] += 1
        original(self, call, grad_output)

    monkeypatch.setattr(GradSampleModule, "_on_grad_output", counting)
    torch.manual_seed(0)
    model = RecurrentNet(DPLSTM(INPUT, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True))
    gsm = GradSampleModule(model, loss_reduction="sum")
    for steps in (2, 7):
        counts.append(0)
        output, _ = gsm(torch.randn(BATCH, steps, INPUT))
        loss = output.square().sum()
        grads = torch.autograd.grad(loss, list(model.rnn.parameters()), allow_unused=True)
        assert all(g is None for g in grads)
    assert counts == [9, 9]  # 4 layer-directions x (gates + projection) + the head


def test_empty_batch():
    model = RecurrentNet(DPLSTM(INPUT, 4, batch_first=True))
    gsm = GradSampleModule(model, loss_reduction="sum")
    output, _ = gsm(torch.randn(0, STEPS, INPUT))
    output.sum().backward()
    assert gsm.per_sample_norms.shape == (0,)


def test_rule_is_registered_and_captures_internally():
    assert get_rule(DPLSTM(2, 3)) is SEQUENCE_LINEAR_RULE and get_rule(DPMultiheadAttention(4, 2)) is SEQUENCE_LINEAR_RULE
    assert SEQUENCE_LINEAR_RULE.captures_internally


@pytest.mark.parametrize("pad", [False, True])
def test_rule_on_row_and_column_terms(pad):
    """A weight filled by row blocks from different inputs (attention's packed in-projection), one
    input shorter than the captured tensor, and a bias over all columns: against autograd."""
    gen = torch.Generator().manual_seed(0)
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(6, 3, generator=gen))
    module.other = nn.Parameter(torch.randn(2, 4, generator=gen))
    module.bias = nn.Parameter(torch.randn(8, generator=gen))
    spec = SequenceLinear(
        (WeightTerm("weight", 0, (0, 4), (0, 4)), WeightTerm("weight", 1, (4, 6), (4, 6)), WeightTerm("other", 2, None, (6, 8))),
        ("bias",),
    )
    a0, a1 = torch.randn(3, 5, 3, generator=gen), torch.randn(3, 4 if pad else 5, 3, generator=gen)
    a2 = torch.randn(3, 5, 4, generator=gen)
    g = torch.randn(3, 5, 8, generator=gen)
    if pad:
        g[:, 4:, 4:6] = 0  # positions past a1's end do not depend on it
    expected = {}
    for i in range(3):
        y = torch.cat([
            a0[i] @ module.weight[:4].T, nn.functional.pad(a1[i] @ module.weight[4:].T, (0, 0, 0, 5 - a1.shape[1])),
            a2[i] @ module.other.T,
        ], -1) + module.bias
        grads = torch.autograd.grad((y * g[i]).sum(), [module.weight, module.other, module.bias])
        for name, grad in zip(("weight", "other", "bias"), grads):
            expected.setdefault(name, []).append(grad)
    expected = {n: torch.stack(v) for n, v in expected.items()}
    inputs = (spec, a0, a1, a2)
    grad_sample = SEQUENCE_LINEAR_RULE.grad_sample(module, inputs, g)
    norms = SEQUENCE_LINEAR_RULE.norm_sq_per_param(module, inputs, g)
    factors = torch.rand(3, generator=gen)
    clipped = SEQUENCE_LINEAR_RULE.clipped_grad(module, inputs, g, {"weight": factors, "other": factors * 2, "bias": factors})
    for name, grads in expected.items():
        assert_rel_close(grad_sample[name], grads)
        torch.testing.assert_close(norms[name].double(), grads.flatten(1).double().square().sum(1), rtol=1e-5, atol=0)
        scale = 2 if name == "other" else 1
        assert_rel_close(clipped[name], torch.einsum("b,b...->...", factors * scale, grads))


def test_fixed_transformer_layer_matches_microbatching():
    """nn.TransformerEncoderLayer after ModuleValidator.fix: its attention is DPMultiheadAttention."""
    from fastdp import ModuleValidator

    torch.manual_seed(0)
    model = ModuleValidator.fix(nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True))
    assert isinstance(model.self_attn, DPMultiheadAttention)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, STEPS, 6, generator=gen)
    padding = torch.zeros(BATCH, STEPS, dtype=torch.bool)
    padding[2, -2:] = True
    check_engine(model, lambda m, rows: torch.tanh(m(x[rows], src_key_padding_mask=padding[rows])).square().sum())


def test_functorch_mode_keeps_the_layer_rule():
    """torch.func cannot see inside a recurrence; in mode="functorch" the DP layers keep their rule."""
    torch.manual_seed(0)
    model = RecurrentNet(DPGRU(INPUT, 4, batch_first=True))
    gsm = check_engine(model, recurrent_loss(True), mode="functorch")
    assert gsm._module.rnn.weight_ih_l0.grad_sample.shape == (BATCH, 12, INPUT)


@pytest.mark.parametrize("make", [lambda: DPLSTM(6, 8, proj_size=3, batch_first=True), lambda: DPGRU(6, 8, batch_first=True)])
def test_bf16_autocast_norms_are_close_to_fp32(make):
    """Under autocast the projections run in bf16 and the taps follow them: norms stay within rounding."""
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(BATCH, STEPS, 6, generator=torch.Generator().manual_seed(1))
    norms = []
    for enabled in (False, True):
        gsm = GradSampleModule(copy.deepcopy(layer), loss_reduction="sum")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            output = gsm(x)[0]
        output.float().square().sum().backward()
        norms.append(gsm.per_sample_norms)
    assert norms[1].dtype == torch.float32
    torch.testing.assert_close(norms[1], norms[0], rtol=3e-2, atol=0)
