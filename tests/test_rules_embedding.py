"""nn.Embedding and nn.EmbeddingBag rules against microbatching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdp import GradSampleModule
from fastdp.engine.clipping import PerLayerClipping
from fastdp.engine.rules import get_rule
from .microbatch import split_batch
from .rule_testing import check_low_precision_norms, check_rule_on_samples, randint
from .rule_testing import check_empty_batch, check_rule

#: bf16 rounds each output-grad element by at most 2^-8 relative, so squared norms move by < 2^-7
BF16_NORM_RTOL = 1e-2


def random_ids_shape(gen: torch.Generator, batch: int) -> tuple:
    """[B] plus 0-2 extra dims: ids of any shape [B, *]."""
    return (batch, *(randint(gen, 1, 5) for _ in range(randint(gen, 0, 3))))


@pytest.mark.parametrize("seed", range(12))
def test_embedding_matches_microbatch(seed):
    """Small vocabularies force tokens repeated within and across samples; half the cases pad."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_embeddings = randint(gen, 2, 10)
    padding_idx = randint(gen, -num_embeddings, num_embeddings) if seed % 2 else None  # negative: from the end
    module = nn.Embedding(num_embeddings, randint(gen, 1, 7), padding_idx=padding_idx)
    ids = torch.randint(num_embeddings, random_ids_shape(gen, randint(gen, 1, 6)), generator=gen)
    check_rule(module, ids)


def test_embedding_repeated_token_contributes_norm_of_sum():
    torch.manual_seed(0)
    module = nn.Embedding(5, 3, padding_idx=4)
    ids = torch.tensor([[1, 1, 2, 4], [1, 3, 3, 4]])
    grad_output = torch.randn(2, 4, 3)
    norms = get_rule(module).norm_sq(module, (ids,), grad_output)
    g = grad_output.double()
    expected = torch.stack([
        (g[0, 0] + g[0, 1]).square().sum() + g[0, 2].square().sum(),
        g[1, 0].square().sum() + (g[1, 1] + g[1, 2]).square().sum(),
    ])
    assert (norms >= expected).all()  # upper bounds (fastdp.ops.rounding), tight for these tokens
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
    check_rule(module, ids)


def test_embedding_int32_ids_batch_of_one_and_empty_batch():
    torch.manual_seed(0)
    module = nn.Embedding(7, 4, padding_idx=0)
    ids = torch.randint(7, (1, 6), dtype=torch.int32)
    check_rule(module, ids)
    check_empty_batch(module, ids)


def test_embedding_frozen_weight_costs_nothing():
    module = nn.Embedding(7, 4).requires_grad_(False)
    ids, grad_output = torch.randint(7, (3, 5)), torch.randn(3, 5, 4)
    rule = get_rule(module)
    assert not rule.norm_sq(module, (ids,), grad_output).any()
    assert rule.clipped_grad(module, (ids,), grad_output, torch.ones(3)) == {}
    assert rule.grad_sample(module, (ids,), grad_output) == {}


def test_sparse_embedding_gets_dense_gradients():
    torch.manual_seed(0)
    module = nn.Embedding(9, 4, sparse=True, padding_idx=2)
    dense = nn.Embedding(9, 4, padding_idx=2)
    dense.weight.data.copy_(module.weight.data)
    ids = torch.randint(9, (4, 5))
    check_rule_on_samples(module, (ids,), split_batch(ids), torch.randn(4, 5, 4), reference=dense)


def test_embedding_bf16_norms_close_to_fp32():
    torch.manual_seed(0)
    module = nn.Embedding(11, 16, padding_idx=3)
    ids, grad_output = torch.randint(11, (4, 9)), torch.randn(4, 9, 16)
    check_low_precision_norms(module, (ids,), grad_output, torch.bfloat16, BF16_NORM_RTOL)


@pytest.mark.parametrize("module_type", [nn.Embedding, nn.EmbeddingBag])
@pytest.mark.parametrize(
    "options, problem",
    [({"max_norm": 1.0}, "max_norm"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq")],
)
def test_lookup_options_that_break_clipping_are_rejected(module_type, options, problem):
    module = module_type(5, 3, **options)
    with pytest.raises(ValueError, match=problem):
        get_rule(module).check(module)


def test_embedding_bag_max_mode_is_rejected():
    module = nn.EmbeddingBag(5, 3, mode="max")
    with pytest.raises(ValueError, match="mode='sum' or mode='mean'"):
        get_rule(module).check(module)


def random_bag_module(gen: torch.Generator, mode: str, padded: bool, **options) -> nn.EmbeddingBag:
    num_embeddings = randint(gen, 2, 8)
    padding_idx = randint(gen, 0, num_embeddings) if padded else None
    dim = randint(gen, 1, 6)
    return nn.EmbeddingBag(num_embeddings, dim, mode=mode, padding_idx=padding_idx, **options)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag_2d_matches_microbatch(seed, mode, weighted):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = random_bag_module(gen, mode, padded=seed % 2 == 1)
    batch, bag_size = randint(gen, 1, 5), randint(gen, 1, 6)
    ids = torch.randint(module.num_embeddings, (batch, bag_size), generator=gen)
    weights = torch.randn(batch, bag_size) if weighted else None
    samples = [(ids[i : i + 1], None, None if weights is None else weights[i : i + 1]) for i in range(batch)]
    check_rule_on_samples(module, (ids, None, weights), samples, torch.randn(batch, module.embedding_dim))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_embedding_bag_offsets_match_microbatch(seed, include_last_offset, mode, weighted):
    """1-D input with offsets; bag sizes include 0 (empty bags), and bags of padding only. With
    include_last_offset a token past the last offset is appended: the forward ignores it."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = random_bag_module(gen, mode, padded=seed % 2 == 1, include_last_offset=include_last_offset)
    bag_sizes = torch.randint(0, 5, (randint(gen, 1, 6),), generator=gen)
    ends = bag_sizes.cumsum(0)
    starts = ends - bag_sizes
    ids = torch.randint(module.num_embeddings, (int(ends[-1]) + include_last_offset,), generator=gen)
    if module.padding_idx is not None and len(bag_sizes) > 1:
        ids[starts[1] : ends[1]] = module.padding_idx
    weights = torch.randn(ids.shape) if weighted else None
    offsets = torch.cat([starts, ends[-1:]]) if include_last_offset else starts
    samples = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        sample_offsets = torch.tensor([0, end - start] if include_last_offset else [0])
        samples.append((ids[start:end], sample_offsets, None if weights is None else weights[start:end]))
    check_rule_on_samples(module, (ids, offsets, weights), samples, torch.randn(len(bag_sizes), module.embedding_dim))


def assert_bags_clipped_as_microbatching(gsm, weight: torch.Tensor, expected: torch.Tensor) -> None:
    """After one backward of ``gsm`` (no clipping policy): its per-sample norms are those of ``expected``
    (microbatching's per-bag gradients, [B, *weight.shape]), and random clip factors sum them as it does."""
    torch.testing.assert_close(gsm.per_sample_norms.double(), expected.flatten(1).norm(dim=1).double(), rtol=1e-5, atol=1e-6)
    factors = torch.rand(expected.shape[0])
    gsm.accumulate_clipped_grads(factors)
    torch.testing.assert_close(weight.grad, torch.einsum("b,bvd->vd", factors, expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["bk", "hooks"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_as_the_whole_model_counts_bags_not_tokens(mode, include_last_offset):
    """GradSampleModule(nn.EmbeddingBag) called on flat ids and offsets: the samples are the bags (the first
    tensor argument has one row per token), clipped as microbatching's per-bag gradients."""
    torch.manual_seed(0)
    module = nn.EmbeddingBag(10, 5, mode="sum", include_last_offset=include_last_offset)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 7])
    starts, ends = [0, 1, 3, 4], [1, 3, 4, 7]
    offsets = torch.tensor(starts + [7] if include_last_offset else starts)
    g = torch.randn(4, 5)
    expected = torch.stack([
        torch.autograd.grad((module(ids[a:b], torch.tensor([0, b - a] if include_last_offset else [0])) * g[i]).sum(),
                            module.weight)[0]
        for i, (a, b) in enumerate(zip(starts, ends))
    ])
    gsm = GradSampleModule(module, mode=mode, loss_reduction="sum")
    (gsm(ids, offsets) * g).sum().backward()
    assert_bags_clipped_as_microbatching(gsm, module.weight, expected)


def test_embedding_bag_empty_batch_and_bf16():
    torch.manual_seed(0)
    module = nn.EmbeddingBag(10, 8, mode="mean", padding_idx=1)
    ids = torch.randint(10, (4, 6))
    check_empty_batch(module, ids)
    check_low_precision_norms(module, (ids,), torch.randn(4, 8), torch.bfloat16, BF16_NORM_RTOL)


def test_embedding_bag_clipped_sum_holds_no_token_gradients():
    """A bag's per-sample gradient is rank one: the norms and the clipped sum keep scalars per token and rows
    a chunk at a time, never the [N, dim] token gradients (N tokens) that non-private training does without."""
    from .test_grad_buffer import _peak_allocated

    torch.manual_seed(0)
    batch, length, dim = 64, 200, 64
    module = nn.EmbeddingBag(2000, dim, mode="mean")
    reference = nn.EmbeddingBag(2000, dim, mode="mean", _weight=module.weight.detach().clone())
    ids = torch.randint(2000, (batch * length,))
    offsets = torch.arange(0, batch * length, length)
    g = torch.randn(batch, dim)
    gsm = GradSampleModule(module, loss_reduction="sum", clipping=PerLayerClipping({id(module.weight): 1.0}))
    output = gsm(ids, offsets)
    peak = _peak_allocated(lambda: (output * g).sum().backward())  # clipped inside the backward
    token_gradient_bytes = ids.numel() * dim * 4
    assert peak <= module.weight.numel() * 4 + token_gradient_bytes // 2, (peak, token_gradient_bytes)
    expected = torch.stack([
        torch.autograd.grad((reference(ids[i * length : (i + 1) * length].unsqueeze(0)) * g[i]).sum(), reference.weight)[0]
        for i in range(batch)
    ])
    factors = (1.0 / expected.flatten(1).double().norm(dim=1)).clamp(max=1).float()
    torch.testing.assert_close(module.weight.grad, torch.einsum("b,bvd->vd", factors, expected), rtol=1e-4, atol=1e-6)


class SequenceFirstBagModel(nn.Module):
    """A sequence-first model ([T, B] tokens) whose EmbeddingBag takes the bags as rows, as torch defines it."""

    def __init__(self, dim: int, flat: bool):
        super().__init__()
        self.flat = flat
        self.bag = nn.EmbeddingBag(10, dim, mode="mean")

    def forward(self, tokens):
        bags = tokens.t()
        if self.flat:
            return self.bag(bags.reshape(-1), torch.arange(0, bags.numel(), bags.shape[1]))
        return self.bag(bags)


@pytest.mark.parametrize("mode", ["bk", "hooks"])
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dim", [3, 4])  # 4: as many output columns as samples
def test_embedding_bag_in_a_sequence_first_model_clips_its_bags(mode, flat, dim):
    """GradSampleModule(batch_first=False): the bag's rows are still its samples (it was refused, or crashed
    when its width equalled the batch)."""
    torch.manual_seed(0)
    model = SequenceFirstBagModel(dim, flat)
    weight = model.bag.weight.detach().clone().requires_grad_()
    tokens, g = torch.randint(10, (5, 4)), torch.randn(4, dim)
    expected = torch.stack([
        torch.autograd.grad((F.embedding_bag(tokens[:, i : i + 1].t(), weight, mode="mean") * g[i]).sum(), weight)[0]
        for i in range(4)
    ])
    gsm = GradSampleModule(model, batch_first=False, mode=mode, loss_reduction="sum")
    (gsm(tokens) * g).sum().backward()
    assert_bags_clipped_as_microbatching(gsm, model.bag.weight, expected)
