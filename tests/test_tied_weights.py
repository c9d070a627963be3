"""Shared parameters (tied embedding / lm_head, a layer applied several times) by cross terms.

The per-sample gradient of a shared parameter is the sum over its uses; the engine takes its
norm from each use's own norm plus the uses' cross inner products (outer-factor Grams), and
never materialises the parameter's per-sample gradients. Everything is checked against
per-sample autograd (one sample at a time).
"""

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastdp.engine.clipping import FlatClipping, PerLayerClipping
from fastdp.engine.grad_sample_module import GradSampleModule
from fastdp.engine.rules.embedding import EmbeddingLookupRule
from fastdp.engine.rules.linear import LinearRule
from fastdp.ops.embedding import embedding_cross_inner, embedding_linear_cross_inner
import fastdp.ops.linear as linear_ops
from fastdp.ops.linear import linear_cross_inner

from .models import clipped_sum
from .rule_testing import assert_norm_bounds

BATCH, VOCAB, DIM = 4, 50, 16


class TiedLM(nn.Module):
    """Embedding (with padding_idx) tied to the lm_head; one block applied ``block_uses`` times."""

    def __init__(self, block_uses=2):
        super().__init__()
        self.block_uses = block_uses
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.block = nn.Linear(DIM, DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(self.block_uses):
            h = torch.tanh(self.block(h))
        return self.lm_head(h)


class RepeatedLinear(nn.Module):
    """One Linear (weight and bias) applied ``uses`` times, then a head."""

    def __init__(self, uses):
        super().__init__()
        self.uses = uses
        self.block = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x):
        for _ in range(self.uses):
            x = torch.tanh(self.block(x))
        return self.head(x)


class Conv1DTiedToLinear(nn.Module):
    """A Hugging Face Conv1D ([in, out] layout) sharing weight and bias with an nn.Linear ([out, in])."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.linear = nn.Linear(DIM, DIM)
        self.conv = Conv1D(DIM, DIM)
        self.conv.weight = self.linear.weight
        self.conv.bias = self.linear.bias
        self.head = nn.Linear(DIM, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.linear(x)))))


class ScaledTiedLinear(nn.Module):
    """A module no rule knows (functorch fallback) sharing a Linear's weight: no outer factors."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, x):
        return 0.5 * x @ self.weight.T


class FallbackShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(DIM, DIM)
        self.other = ScaledTiedLinear(self.block)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.other(torch.tanh(self.block(x)))))


def _tokens(seq):
    """Token ids with repeats and padding tokens (id 0) in every sample."""
    tokens = torch.randint(0, VOCAB, (BATCH, seq))
    tokens[:, ::2] = torch.randint(0, 4, (BATCH, (seq + 1) // 2))  # few distinct ids: repeats and padding
    return tokens


def _case(name, seq):
    """(model, input, targets); ``seq`` = 1 feeds T = 1 (tokens [B, 1], features [B, d])."""
    torch.manual_seed(0)
    if name.startswith("tied_lm"):
        model = TiedLM(block_uses=int(name[-1]))
        return model, _tokens(seq), torch.randint(0, VOCAB, (BATCH, seq))
    if name == "conv1d":
        pytest.importorskip("transformers")
        model = Conv1DTiedToLinear()
    elif name == "fallback":
        model = FallbackShared()
    else:
        model = RepeatedLinear(uses=int(name[-1]))
    x = torch.randn(BATCH, DIM) if seq == 1 else torch.randn(BATCH, seq, DIM)
    return model, x, torch.randint(0, 5, (BATCH,) if seq == 1 else (BATCH, seq))


def _loss(output, targets, reduction):
    """Sum over a sample's tokens; over samples sum or mean."""
    loss = F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss / targets.shape[0] if reduction == "mean" else loss


def _per_sample_grads(model, x, targets):
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(_loss(model(x[i : i + 1]), targets[i : i + 1], "sum"), list(params.values()))
        rows.append(grads)
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(params)}


def _close(actual, expected, scale, rtol=1e-4):  # the engine clips with upper bounds of the norms
    assert (actual - expected.to(actual.dtype)).norm() <= rtol * scale, float((actual - expected).norm() / scale)


CASES = ["tied_lm_2", "tied_lm_3", "linear_x2", "linear_x3", "conv1d", "fallback"]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("seq", [1, 6])
@pytest.mark.parametrize("name", CASES)
def test_norms_and_clipped_step_equal_microbatching(name, seq, reduction):
    model, x, targets = _case(name, seq)
    expected = _per_sample_grads(model, x, targets)
    expected_norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in expected.values()))
    max_grad_norm = float(expected_norms.median())  # some samples clipped, some not
    gsm = GradSampleModule(model, loss_reduction=reduction, clipping=FlatClipping(max_grad_norm))
    _loss(gsm(x), targets, reduction).backward()

    assert_norm_bounds(gsm.per_sample_norms, expected_norms, atol=1e-6)
    reference = clipped_sum(expected, max_grad_norm)
    scale = float(torch.sqrt(sum(g.double().square().sum() for g in reference.values())))
    for param_name, param in model.named_parameters():
        _close(param.grad, reference[param_name], scale)


@pytest.mark.parametrize("name", ["tied_lm_2", "linear_x3"])
def test_per_layer_clipping_of_shared_parameters_equals_microbatching(name):
    model, x, targets = _case(name, 6)
    expected = _per_sample_grads(model, x, targets)
    params = dict(model.named_parameters())
    bounds = {n: float(g.flatten(1).norm(dim=1).median()) for n, g in expected.items()}
    gsm = GradSampleModule(
        model, loss_reduction="sum", clipping=PerLayerClipping({id(params[n]): b for n, b in bounds.items()})
    )
    _loss(gsm(x), targets, "sum").backward()
    for param_name, grads in expected.items():
        norms = grads.flatten(1).double().norm(dim=1)
        factors = (bounds[param_name] / (norms + 1e-6)).clamp(max=1.0)
        reference = torch.einsum("b,b...->...", factors.to(grads.dtype), grads)
        _close(params[param_name].grad, reference, float(reference.norm()) + 1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (the backward's ops included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _refuse_grad_sample(*args, **kwargs):
    raise AssertionError("a shared parameter's per-sample gradients were materialised")


@pytest.mark.parametrize("block_uses", [2, 3])
def test_tied_parameters_are_never_materialised(monkeypatch, block_uses):
    model, tokens, targets = _case(f"tied_lm_{block_uses}", 6)
    reference = copy.deepcopy(model)
    monkeypatch.setattr(LinearRule, "grad_sample", _refuse_grad_sample)
    monkeypatch.setattr(EmbeddingLookupRule, "grad_sample", _refuse_grad_sample)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(1.0))
    loss = _loss(gsm(tokens), targets, "sum")
    with _LargestTensor() as watch:
        loss.backward()
    # [B, V, D] would be the tied weight's per-sample gradients; nothing in the step may be that large
    assert watch.largest < BATCH * VOCAB * DIM, watch.largest
    assert watch.largest >= BATCH * 6 * VOCAB  # the watch saw the backward (the logits' gradient)
    expected = _per_sample_grads(reference, tokens, targets)
    expected_norms = torch.sqrt(sum(g.flatten(1).double().square().sum(1) for g in expected.values()))
    assert_norm_bounds(gsm.per_sample_norms, expected_norms, atol=1e-6)


def test_hooks_mode_still_materialises_shared_parameters():
    model, tokens, targets = _case("tied_lm_2", 6)
    expected = _per_sample_grads(model, tokens, targets)
    gsm = GradSampleModule(model, loss_reduction="sum", mode="hooks", clipping=FlatClipping(1.0))
    _loss(gsm(tokens), targets, "sum").backward()
    _close(model.embed.weight.grad_sample, expected["embed.weight"], float(expected["embed.weight"].norm()))


@pytest.mark.parametrize("shapes", [(3, 1, 1, 5, 7), (2, 4, 6, 5, 7), (3, 7, 2, 9, 4)])
def test_cross_inner_ops_equal_dense_products(shapes, monkeypatch):
    """The cross-term ops are upper bounds (``fastdp.ops.rounding``) within float32 rounding of the exact value."""
    B, T1, T2, p, d = shapes
    torch.manual_seed(0)
    x1, y1, x2, y2 = torch.randn(B, T1, p), torch.randn(B, T1, d), torch.randn(B, T2, p), torch.randn(B, T2, d)
    dense = (torch.bmm(x1.double().mT, y1.double()) * torch.bmm(x2.double().mT, y2.double())).sum((1, 2))
    for method in ("ghost", "direct"):
        monkeypatch.setattr(linear_ops, "choose_cross_method", lambda *shape, method=method: method)
        bound = linear_cross_inner(x1, y1, x2, y2)
        assert (bound >= dense).all(), method
        torch.testing.assert_close(bound, dense, rtol=1e-4, atol=1e-5)

    ids1, ids2 = torch.randint(0, p, (B, T1)), torch.randint(0, p, (B, T2))  # repeats likely: p is small
    onehot1, onehot2 = F.one_hot(ids1, p).float(), F.one_hot(ids2, p).float()
    expected = (torch.bmm(onehot1.double().mT, y1.double()) * torch.bmm(x2.double().mT, y2.double())).sum((1, 2))
    bound = embedding_linear_cross_inner(ids1, y1, x2, y2)
    assert (bound >= expected).all()
    torch.testing.assert_close(bound, expected, rtol=1e-4, atol=1e-5)
    expected = (torch.bmm(onehot1.double().mT, y1.double()) * torch.bmm(onehot2.double().mT, y2.double())).sum((1, 2))
    bound = embedding_cross_inner(ids1, y1, ids2, y2)
    assert (bound >= expected).all()
    torch.testing.assert_close(bound, expected, rtol=1e-4, atol=1e-5)
