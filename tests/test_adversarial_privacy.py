"""No sample moves a step by more than C, whatever an adversary puts in it.

Each test crafts a batch as an adversary would: a sample whose gradient terms are huge and cancel,
parameters used twice whose uses cancel, layers whose rows are not samples, several forwards
before one backward, losses that couple samples, state left behind by an interrupted loop. It
checks by leave-one-out that ‖Σ_with − Σ_without‖ ≤ C (per parameter for per-layer clipping),
or that the engine refuses the batch with a clear error. Where the guard is a rounding bound
(``fastdp.ops.rounding``), the test also shows that without it the crafted sample breaks C.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.engine.clipping import AutomaticClipping, FlatClipping, PerLayerClipping
from fastdp.engine.grad_sample_module import GradSampleModule
from fastdp.layers import DPRNN

from .rule_testing import without_rounding_bounds

C = 1.0
TOLERANCE = 1e-6  # the final rounding of the batch's sum, not per sample
MODES = ["bk", "hooks", "functorch"]
CLIPPINGS = ["flat", "per_layer", "automatic"]


def _policy(model: nn.Module, clipping: str):
    if clipping == "flat":
        return FlatClipping(C)
    if clipping == "automatic":
        return AutomaticClipping(C)
    return PerLayerClipping({id(p): C for p in model.parameters() if p.requires_grad})


def clipped_sum(build, batch, *, mode="bk", clipping="flat"):
    """``{name: Σ_i c_i g_i}`` (float64) of one step on ``batch`` = (inputs..., target): the loss is
    ``Σ <model(*inputs), target>``, so ``target`` is the output gradient of every position."""
    torch.manual_seed(0)
    model = build()
    gsm = GradSampleModule(model, loss_reduction="sum", mode=mode, clipping=_policy(model, clipping))
    *inputs, target = batch
    output = gsm(*inputs)
    (output.double() * target.double()).sum().backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def leave_one_out(build, batch, index, *, mode="bk", clipping="flat"):
    """‖Σ_with − Σ_without sample ``index``‖: overall, or the largest per parameter (per-layer clipping)."""
    keep = [i for i in range(batch[0].shape[0]) if i != index]
    with_sample = clipped_sum(build, batch, mode=mode, clipping=clipping)
    without = clipped_sum(build, tuple(t[keep] for t in batch), mode=mode, clipping=clipping)
    differences = {n: g - without.get(n, torch.zeros_like(g)) for n, g in with_sample.items()}
    if clipping == "per_layer":
        return max(float(d.norm()) for d in differences.values())
    return float(torch.sqrt(sum(d.square().sum() for d in differences.values())))


def _honest(batch_size, positions, d, p, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, positions, d, generator=generator), torch.randn(batch_size, positions, p, generator=generator) * 0.3


def cancelling_positions(ratio: float, d: int = 8, p: int = 8, norm: float = 10 * C):
    """One sample of two positions whose terms g_t ⊗ a_t have size ``ratio·norm`` and cancel to a
    gradient of norm ``norm``: a_1 = (M, 0, ...), a_2 = (M, ε, 0, ...), g_1 = v, g_2 = −v, so
    G = −ε v ⊗ e_2 with ‖v‖ = 1, ε = norm and M = ratio · norm."""
    a = torch.zeros(2, d)
    a[:, 0] = ratio * norm
    a[1, 1] = norm
    v = torch.ones(p) / math.sqrt(p)
    return a, torch.stack([v, -v])


def linear_batch(ratio, batch_size=5):
    a, g = _honest(batch_size, 2, 8, 8)
    a[-1], g[-1] = cancelling_positions(ratio)  # last: after the honest samples in every reduction
    return a, g


def _linear():
    return nn.Linear(8, 8)


# -- 1. norms are upper bounds: a sample whose terms cancel ---------------------------------------
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_a_linear_sample_whose_terms_cancel_moves_the_step_by_at_most_c(mode, clipping):
    """Its ghost norm (T=2 < pd/(d+p)) loses every digit in float32: it came out 0, and the sample
    moved the step by 10·C (flat, per-layer) or 1000·C (automatic, C/γ)."""
    batch = linear_batch(ratio=1e4)
    assert leave_one_out(_linear, batch, 4, mode=mode, clipping=clipping) <= C * (1 + TOLERANCE)


def test_without_the_norm_bounds_the_cancelling_sample_is_not_clipped(monkeypatch):
    """The bound is what saves the sample above: without it, bk mode lets it through whole."""
    batch = linear_batch(ratio=1e4)
    without_rounding_bounds(monkeypatch)
    assert leave_one_out(_linear, batch, 4) > 5 * C
    assert leave_one_out(_linear, batch, 4, clipping="automatic") > 100 * C


class Conv1x1Over2Positions(nn.Module):
    """The linear sample as a 1×1 convolution: positions are the spatial dims."""

    def __init__(self, ndim):
        super().__init__()
        self.ndim = ndim
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1](8, 8, 1)

    def forward(self, a):  # a: [B, 2, d] → channels first, positions on the last spatial dim
        x = a.mT.reshape(a.shape[0], 8, *([1] * (self.ndim - 1)), 2)
        return self.conv(x).reshape(a.shape[0], 8, 2).mT


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_a_conv_sample_whose_terms_cancel_moves_the_step_by_at_most_c(ndim, clipping):
    batch = linear_batch(ratio=1e4)
    build = lambda: Conv1x1Over2Positions(ndim)  # noqa: E731
    assert leave_one_out(build, batch, 4, clipping=clipping) <= C * (1 + TOLERANCE)


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_blocked_in_place_clipped_sums_keep_a_cancelling_sample_within_c(clipping, monkeypatch):
    """The in-place clipped sums form large weights' sums in blocks (linear: blocks of output features and of
    samples; conv: blocks of output channels); forced here on small layers, the cancelling sample still
    moves the step by at most C."""
    import fastdp.ops.conv as conv_ops
    import fastdp.ops.linear as linear_ops

    monkeypatch.setattr(linear_ops, "MIN_SCALED_NUMEL", 1)
    monkeypatch.setattr(conv_ops, "MIN_BLOCKED_WEIGHT_NUMEL", 0)
    a, g = _honest(5, 2, 8, 128)
    a[-1], g[-1] = cancelling_positions(1e4, p=128)  # 128 features: two blocks of them, three of samples
    assert leave_one_out(lambda: nn.Linear(8, 128), (a, g), 4, clipping=clipping) <= C * (1 + TOLERANCE)
    build = lambda: Conv1x1Over2Positions(2)  # noqa: E731  (8 output channels: four blocks of two)
    assert leave_one_out(build, linear_batch(ratio=1e4), 4, clipping=clipping) <= C * (1 + TOLERANCE)


class PointwiseConvOverManyPositions(nn.Module):
    """A 1-channel 1×1 convolution over 64 positions: its per-sample weight gradients (one number) are
    smaller than its input and output gradient, so the engine materialises them (the grouped
    weight-gradient call) and clips and sums those."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 1)

    def forward(self, a):  # a: [B, T, 1]
        return self.conv(a.mT).mT


def test_a_materialised_conv_sample_whose_terms_cancel_moves_the_step_by_at_most_c():
    from fastdp.engine.rules.conv import ConvRule

    a, g = _honest(5, 64, 1, 1)
    a[-1], g[-1] = 0, 0
    a[-1, 0, 0], a[-1, 1, 0] = 1e4 * 10 * C, 1e4 * 10 * C + 10 * C  # terms of 1e5·C cancelling to 10·C
    g[-1, 0, 0], g[-1, 1, 0] = 1.0, -1.0
    conv = PointwiseConvOverManyPositions().conv
    assert ConvRule().prefers_grad_sample(conv, (a.mT,), g.mT)  # the materialised path is the one tested
    for clipping in CLIPPINGS:
        assert leave_one_out(PointwiseConvOverManyPositions, (a, g), 4, clipping=clipping) <= C * (1 + TOLERANCE)


def test_a_hf_conv1d_sample_whose_terms_cancel_moves_the_step_by_at_most_c():
    transformers = pytest.importorskip("transformers")
    batch = linear_batch(ratio=1e4)
    build = lambda: transformers.pytorch_utils.Conv1D(8, 8)  # noqa: E731
    for clipping in CLIPPINGS:
        assert leave_one_out(build, batch, 4, clipping=clipping) <= C * (1 + TOLERANCE)


class RecurrentInputProjection(nn.Module):
    """DPRNN(relu) with W_ih = I, W_hh = 0 frozen and h_t = relu(x_t) on positive inputs: the gate
    gradient of step t is the target, so W_ih's per-sample gradient is Σ_t target_t ⊗ x_t — the
    captured sequence-linear point of the recurrent layers."""

    def __init__(self):
        super().__init__()
        self.rnn = DPRNN(8, 8, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_ih_l0.copy_(torch.eye(8))
            self.rnn.weight_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
        self.rnn.weight_hh_l0.requires_grad_(False)

    def forward(self, x):
        return self.rnn(x)[0]


def recurrent_batch(ratio):
    a, g = linear_batch(ratio)
    a = a.abs() + 0.1  # positive inputs: relu passes them, and the gate gradient is the target
    a[-1], _ = cancelling_positions(ratio)
    g[-1] = 0
    g[-1, 0, 0], g[-1, 1, 0] = 1.0, -1.0  # only coordinate 0, where both of its inputs are > 0
    return a, g


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_a_recurrent_sample_whose_steps_cancel_moves_the_step_by_at_most_c(clipping):
    batch = recurrent_batch(1e4)
    assert leave_one_out(RecurrentInputProjection, batch, 4, clipping=clipping) <= C * (1 + TOLERANCE)


def test_the_recurrent_crafted_sample_breaks_c_without_the_bounds(monkeypatch):
    without_rounding_bounds(monkeypatch)
    assert leave_one_out(RecurrentInputProjection, recurrent_batch(1e4), 4) > 5 * C


def embedding_batch(ratio):
    """Token ids [B, 2] and their output gradients: the last sample looks up one row twice with
    gradients M·e_0 and −M·e_0 + ε·e_1 (norm ε = 10·C, terms ratio·ε), after honest samples that use
    that row too."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 6, (5, 2), generator=generator)
    ids[:, 0] = 3
    g = torch.randn(5, 2, 4, generator=generator) * 0.3
    ids[-1] = 3
    g[-1] = 0
    g[-1, 0, 0] = ratio * 10 * C
    g[-1, 1, 0] = -ratio * 10 * C
    g[-1, 1, 1] = 10 * C
    return ids, g


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_an_embedding_sample_whose_tokens_cancel_moves_the_step_by_at_most_c(mode, clipping):
    """Terms of 1e8·ε: summed into the row after other samples' tokens, their rounding alone moved
    the step by several C (the scatter-add rounds the other samples' sum at magnitude M)."""
    ids, g = embedding_batch(1e8)
    build = lambda: nn.Embedding(6, 4)  # noqa: E731
    assert leave_one_out(build, (ids, g), 4, mode=mode, clipping=clipping) <= C * (1 + TOLERANCE)


class BagOfTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 4, mode="sum")

    def forward(self, ids):  # each token its own bag of one, so the target is per token: [B, 2, 4]
        return self.bag(ids.reshape(-1, 1)).reshape(ids.shape[0], 2, 4)


def test_embedding_bag_rows_must_be_samples():
    """A bag per token makes B·2 rows for B samples: refused, not clipped per token."""
    ids, g = embedding_batch(1e8)
    with pytest.raises(ValueError, match="rows are not samples"):
        clipped_sum(BagOfTwo, (ids, g))


class WeightedBag(nn.Module):
    """nn.EmbeddingBag(mode="sum") with per-sample weights, bags [B, L]."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 4, mode="sum")

    def forward(self, ids, weights):
        return self.bag(ids, per_sample_weights=weights)


def weighted_bag_batch(weight):
    """The last sample looks up row 1 twice, with weights ``weight`` and ``16 - weight`` (a power of two up to
    2**28: exact in float32), so its gradient is 16·g_4 (norm 16·C); sample 0 puts 0.13 per element into row 1
    first. A per-token scatter-add rounds that 0.13 at magnitude ``weight`` / 32 and moves the step by 1.24·C."""
    ids = torch.tensor([[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 2], [1, 1, 2]])
    weights = torch.tensor([[1.0, 0.3, 0.2], [0.5, 0.1, 0.9], [0.7, 0.2, 0.4], [0.3, 0.8, 0.6], [weight, 16 - weight, 0.0]])
    g = torch.full((5, 4), 0.1)
    g[0] = 0.13
    g[-1] = 0.5
    return ids, weights, g


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_a_bag_sample_whose_weights_cancel_moves_the_step_by_at_most_c(mode, clipping):
    batch = weighted_bag_batch(2.0**27)
    assert leave_one_out(WeightedBag, batch, 4, mode=mode, clipping=clipping) <= C * (1 + TOLERANCE)


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_a_bag_sample_with_overflowing_weights_and_no_gradient_adds_nothing(clipping):
    """Weights whose sum overflows float32 times an output gradient of 0: the norm is 0, the sample unclipped,
    and its rows (clip factor · coefficient, then · g) must still be 0, not inf · 0 = NaN."""
    ids, weights, g = weighted_bag_batch(1.0)
    ids[-1] = 1
    weights[-1] = 3e38
    g[-1] = 0
    sums = clipped_sum(WeightedBag, (ids, weights, g), clipping=clipping)
    assert all(torch.isfinite(s).all() for s in sums.values())
    assert leave_one_out(WeightedBag, (ids, weights, g), 4, clipping=clipping) <= C * (1 + TOLERANCE)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_dropping_a_bag_zeroes_its_output_gradient_not_the_tokens_at_its_row(clipping):
    """Flat ids with as many tokens as bags: bag 1's gradient is inf, so it is dropped. Its row of the token
    tensors (position 1) is bag 0's second token, whose weight cancels the first: zeroing it there would
    release bag 0's cancelled weight 5·g_0 (norm 5·C) unclipped."""
    torch.manual_seed(0)
    module = nn.EmbeddingBag(6, 4, mode="sum")
    ids, offsets = torch.tensor([3, 3, 1]), torch.tensor([0, 2, 3])  # bags: tokens {0, 1}, {2}, {}
    weights = torch.tensor([5.0, -5.0, 1.0])
    g = torch.ones(3, 4) / 2
    g[1, 0] = math.inf
    gsm = GradSampleModule(module, loss_reduction="sum", clipping=_policy(module, clipping))
    output = gsm(ids, offsets, per_sample_weights=weights)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        torch.autograd.backward(output, g)
    assert torch.equal(module.weight.grad, torch.zeros(6, 4))  # bag 0 cancels, bag 1 is dropped, bag 2 is empty


# -- 2. shared parameters whose uses cancel -------------------------------------------------------
class Siamese(nn.Module):
    """One Linear on both inputs, difference of the outputs: its uses' gradients cancel."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8, bias=False)

    def forward(self, x1, x2):
        return self.shared(x1) - self.shared(x2)


def siamese_batch(ratio):
    """The last sample's two inputs differ by ε = 10·C in one coordinate, its uses' gradients are each
    ratio times larger; δ in the other coordinate makes the float32 Gram x1·x2 = M² + 600 round up to
    M² + 1024, so the cross term swamps ε² without its bound."""
    generator = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    target = torch.randn(5, 8, generator=generator) * 0.3
    x1[-1] = 0
    x1[-1, 0] = ratio * 10 * C
    x1[-1, 1] = 20 * C
    x2[-1] = x1[-1]
    x2[-1, 1] = 30 * C  # G = v ⊗ (x1 − x2) = −10·C v ⊗ e_1
    target[-1] = torch.ones(8) / math.sqrt(8)
    return x1, x2, target


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_a_shared_linear_whose_uses_cancel_moves_the_step_by_at_most_c(mode, clipping):
    """‖G1 + G2‖² = ‖G1‖² + ‖G2‖² + 2<G1, G2> lost every digit and was clamped to 0: 10·C."""
    assert leave_one_out(Siamese, siamese_batch(1e4), 4, mode=mode, clipping=clipping) <= C * (1 + TOLERANCE)


def test_without_the_cross_term_bounds_the_shared_linear_is_not_clipped(monkeypatch):
    without_rounding_bounds(monkeypatch)
    assert leave_one_out(Siamese, siamese_batch(1e4), 4) > 5 * C


class TiedLookupAndHead(nn.Module):
    """An embedding tied to a linear head, each used once: the per-sample gradient is the sum of a
    lookup's and a linear layer's, whose cross term is a gather."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, x):
        return torch.cat([self.embed(ids), self.head(x)], dim=-1)  # [B, 1, 4 + 6]


def tied_batch(ratio):
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 6, (5, 1), generator=generator)
    x = torch.randn(5, 1, 4, generator=generator)
    target = torch.randn(5, 1, 10, generator=generator) * 0.3
    m, eps = ratio * 10 * C, 10 * C
    ids[-1] = 2
    target[-1] = 0
    target[-1, 0, 0] = m  # lookup of row 2: gradient e_2 ⊗ (M, 3ε, 0, 0)
    target[-1, 0, 1] = 3 * eps
    target[-1, 0, 4 + 2] = -1.0  # head, output row 2: gradient −e_2 ⊗ x
    x[-1] = 0
    x[-1, 0, 0] = m
    x[-1, 0, 1] = 2 * eps  # sum: e_2 ⊗ (0, ε, 0, 0); the float32 cross Gram M² + 600 rounds to M² + 1024
    return ids, x, target


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_an_embedding_tied_to_a_head_whose_uses_cancel_moves_the_step_by_at_most_c(mode, clipping):
    assert leave_one_out(TiedLookupAndHead, tied_batch(1e4), 4, mode=mode, clipping=clipping) <= C * (1 + TOLERANCE)


def test_without_the_bounds_the_tied_sample_is_not_clipped(monkeypatch):
    without_rounding_bounds(monkeypatch)
    assert leave_one_out(TiedLookupAndHead, tied_batch(1e4), 4) > 5 * C


class TwoLookups(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)

    def forward(self, ids):  # [B, 2]: each position its own lookup call
        return torch.stack([self.embed(ids[:, 0]), self.embed(ids[:, 1])], dim=1)


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_one_table_looked_up_twice_whose_uses_cancel_moves_the_step_by_at_most_c(clipping):
    ids, g = embedding_batch(1e4)
    assert leave_one_out(TwoLookups, (ids, g), 4, clipping=clipping) <= C * (1 + TOLERANCE)


# -- 3. rows that are not samples ------------------------------------------------------------------
class PromptTuning(nn.Module):
    """A trainable prompt: an Embedding on arange(P), broadcast over the batch; the rest frozen."""

    def __init__(self, prompt_length=16):
        super().__init__()
        self.prompt_length = prompt_length
        self.prompt = nn.Embedding(prompt_length, 4)
        self.body = nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x):
        prompt = self.prompt(torch.arange(self.prompt_length))  # [P, 4]: its rows are prompt tokens
        h = torch.cat([prompt.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
        return self.body(h)


@pytest.mark.parametrize("mode", MODES)
def test_a_prompt_broadcast_over_the_batch_is_refused(mode):
    """Each prompt row collected the gradients of all 6 samples and was clipped as one sample: one
    real sample moved the step by 2.7·C."""
    model = PromptTuning()
    gsm = GradSampleModule(model, loss_reduction="sum", mode=mode, clipping=FlatClipping(C))
    with pytest.raises(ValueError, match=r"prompt \(Embedding\).*16.*6 samples.*rows are not samples"):
        gsm(torch.randn(6, 3, 4))


def test_the_prompt_indexed_per_sample_is_exact():
    """The fix the error suggests: look the prompt up per sample (ids [B, P]); then each sample's part
    of the prompt's gradient is its own, and leave-one-out stays within C."""

    class PerSamplePrompt(PromptTuning):
        def forward(self, x):
            ids = torch.arange(self.prompt_length).expand(x.shape[0], -1)
            return self.body(torch.cat([self.prompt(ids), x], dim=1))

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 4, generator=generator)
    target = torch.randn(6, 19, 4, generator=generator) * 10  # every sample clipped
    for clipping in CLIPPINGS:
        assert leave_one_out(PerSamplePrompt, (x, target), 2, clipping=clipping) <= C * (1 + TOLERANCE)


def test_a_prompt_refused_through_make_private():
    model = PromptTuning()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 3, 4)), batch_size=6)
    module, optimizer, loader = fastdp.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=C,
    )
    batch = next(batch for batch in loader if len(batch[0]) not in (0, 16))
    with pytest.raises(ValueError, match="rows are not samples"):
        module(batch[0])


class TokensAsRows(nn.Module):
    """Every layer run on the batch's tokens flattened: rows are tokens, not samples."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x.reshape(-1, 4)).reshape(x.shape)


def test_tokens_flattened_into_rows_are_refused():
    with pytest.raises(ValueError, match=r"linear \(Linear\).*dimension is 15.*5 samples"):
        clipped_sum(TokensAsRows, (torch.randn(5, 3, 4), torch.randn(5, 3, 4)))


def test_a_weight_norm_parametrization_is_refused():
    """Its weight is computed from parameters alone: the rows reaching the layer are weight rows."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)))
    with pytest.raises(ValueError, match="parameters alone.*remove_parametrizations"):
        clipped_sum(lambda: model, (torch.randn(6, 4), torch.randn(6, 6)))


def test_position_ids_shared_by_the_batch_stay_per_sample():
    """[1, T] index inputs broadcast by the model are expanded to one row per sample (exact)."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(8, 4)

        def forward(self, x):
            return x + self.pos(torch.arange(x.shape[1])[None])

    generator = torch.Generator().manual_seed(6)
    x, target = torch.randn(5, 3, 4, generator=generator), torch.randn(5, 3, 4, generator=generator) * 10
    for clipping in CLIPPINGS:
        assert leave_one_out(Positions, (x, target), 1, clipping=clipping) <= C * (1 + TOLERANCE)


# -- 4. several forwards before one backward -------------------------------------------------------
def _mlp(state):
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model.load_state_dict(state)
    return model


def _step(state, batches, mode="bk", reduction="sum"):
    """One backward over the summed losses of one forward per (x, target) batch; the clipped sum."""
    model = _mlp(state)
    gsm = GradSampleModule(model, loss_reduction=reduction, mode=mode, clipping=FlatClipping(C))
    losses = [(gsm(x) * t).sum() / (x.shape[0] if reduction == "mean" else 1) for x, t in batches]
    sum(losses).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double(), gsm


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", MODES)
def test_two_forwards_summed_before_one_backward_are_distinct_samples(mode, reduction):
    """Row i of the first and of the second forward were clipped together as one sample (2·C)."""
    state = _mlp(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).state_dict()).state_dict()
    generator = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(4, 4, generator=generator), torch.randn(3, 4, generator=generator)
    t1, t2 = torch.randn(4, 3, generator=generator) * 50, torch.randn(3, 3, generator=generator) * 50
    x2[0], t2[0] = x1[0], t1[0]  # the same sample in both forwards: two samples, each clipped to C
    together, gsm = _step(state, [(x1, t1), (x2, t2)], mode, reduction)
    assert gsm.per_sample_norms.shape == (7,)
    concatenated, _ = _step(state, [(torch.cat([x1, x2]), torch.cat([t1, t2]))], mode)
    torch.testing.assert_close(together, concatenated, rtol=1e-5, atol=1e-7)
    without, _ = _step(state, [(x1[1:], t1[1:]), (x2, t2)], mode, reduction)
    assert float((together - without).norm()) <= C * (1 + TOLERANCE)


def test_hooks_mode_backward_passes_append_samples():
    """A second backward before step() appends its samples to p.grad_sample (Poisson batches of
    different sizes crashed; equal sizes were summed row by row)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    gsm = GradSampleModule(model, loss_reduction="sum", mode="hooks", clipping=FlatClipping(C))
    x1, x2 = torch.randn(3, 4), torch.randn(5, 4)
    gsm(x1).sum().backward()
    gsm(x2).sum().backward()
    assert model.weight.grad_sample.shape == (8, 3, 4)
    expected = torch.ones(8, 3, 1) * torch.cat([x1, x2])[:, None, :]
    torch.testing.assert_close(model.weight.grad_sample, expected)


def test_a_second_backward_through_one_forward_is_refused():
    gsm = GradSampleModule(nn.Linear(4, 3), loss_reduction="sum", clipping=FlatClipping(C))
    out = gsm(torch.randn(3, 4))
    out[:, 0].sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through one forward"):
        out[:, 1].sum().backward()


# -- 5. losses that couple samples -----------------------------------------------------------------
def _bert():
    pytest.importorskip("transformers")
    from .hf_tiny import bert

    torch.manual_seed(0)
    return bert()


def test_a_sequence_classification_loss_with_ignored_labels_is_refused():
    """HF's loss divides by the number of valid labels in the batch: a sample labelled -100 (own
    gradient 0) still moved the step by 0.32·C."""
    gsm = GradSampleModule(_bert(), loss_reduction="mean", clipping=FlatClipping(C))
    ids = torch.randint(1, 100, (4, 6))
    with pytest.raises(ValueError, match="valid labels"):
        gsm(input_ids=ids, labels=torch.tensor([0, 1, -100, 2]))
    gsm(input_ids=ids, labels=torch.tensor([0, 1, 1, 2])).loss.backward()  # every label valid: the mean of per-sample losses


def test_a_hugging_face_model_inside_a_user_module_is_checked_too():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _bert()

        def forward(self, ids, labels):
            return self.model(input_ids=ids, labels=labels).loss

    gsm = GradSampleModule(Wrapper(), loss_reduction="mean", clipping=FlatClipping(C))
    with pytest.raises(ValueError, match="valid labels"):
        gsm(torch.randint(1, 100, (4, 6)), torch.tensor([0, -100, 1, 2]))


def test_check_sample_independence_finds_coupled_losses_and_passes_independent_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    report = fastdp.check_sample_independence(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    assert report.max_error < 1e-9 and report.samples == [0, 2, 5]

    y_ignored = y.clone()
    y_ignored[1] = -100  # cross_entropy's mean over the valid labels: every sample weighs 1/5, not 1/6
    with pytest.raises(ValueError, match="depends on other samples"):
        fastdp.check_sample_independence(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y_ignored))

    def contrastive(m, batch):  # in-batch negatives: every other sample's embedding enters the loss
        z = m(batch[0])
        return F.cross_entropy(z @ z.T, torch.arange(z.shape[0]))

    with pytest.raises(ValueError, match="depends on other samples"):
        fastdp.check_sample_independence(model, contrastive, (x, y))

    batch_norm = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="depends on other samples"):  # it cannot even run on one sample
        fastdp.check_sample_independence(
            batch_norm, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), check_engine=False
        )


def test_check_sample_independence_sees_rows_that_happen_to_be_as_many_as_samples():
    """A prompt of 6 rows on a batch of 6 passes the engine's shape check; the probe's comparison of
    the engine's rows with each sample's own gradient does not."""
    model = PromptTuning(prompt_length=6)
    x = torch.randn(6, 3, 4)
    target = torch.randn(6, 9, 4)
    with pytest.raises(ValueError, match="fastdp's per-sample row"):
        fastdp.check_sample_independence(model, lambda m, b: (m(b[0]) * b[1]).sum() / len(b[0]), (x, target))
    wrapped = GradSampleModule(model, loss_reduction="mean")  # a wrapped model is probed the same way
    with pytest.raises(ValueError, match="fastdp's per-sample row"):
        fastdp.check_sample_independence(wrapped, lambda m, b: (m(b[0]) * b[1]).sum() / len(b[0]), (x, target))


# -- 6. non-finite and huge gradients --------------------------------------------------------------
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("mode", MODES)
def test_huge_inf_and_nan_samples_move_the_step_by_at_most_c(mode, clipping):
    a, g = _honest(6, 2, 8, 8)
    g[1] *= 1e30  # squared norm overflows float32
    g[2, 0, 0] = math.inf
    g[3, 1, 1] = math.nan
    g[4] *= 1e15
    for index in range(1, 5):
        with pytest.warns(RuntimeWarning, match="non-finite"):
            contribution = leave_one_out(_linear, (a, g), index, mode=mode, clipping=clipping)
        assert contribution <= C * (1 + TOLERANCE), index
