"""No sample contributes more than C to the summed gradient, whatever its gradient is."""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastdp.engine.clipping import AutomaticClipping, FlatClipping
from fastdp.engine.grad_sample_module import GradSampleModule

C = 1.0


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _clipped_sum(x, y, policy, mode="bk"):
    model = _model()
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=policy, mode=mode)
    with pytest.warns(RuntimeWarning, match="non-finite") if not torch.isfinite(x).all() else _nothing():
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    return flat, gsm


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _batch():
    torch.manual_seed(1)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    x[0] *= 1e15   # finite gradient with a norm ≈ 1e15: must be clipped to C, not dropped
    x[1] *= 1e30   # squared norm overflows float32: treated as non-finite
    x[2, 0] = math.inf
    x[3, 1] = math.nan
    return x, y


@pytest.mark.parametrize("mode", ["bk", "hooks"])
@pytest.mark.parametrize("policy", [FlatClipping(C), AutomaticClipping(C)], ids=["flat", "automatic"])
def test_each_sample_contributes_at_most_c(policy, mode):
    x, y = _batch()
    total, gsm = _clipped_sum(x, y, policy, mode)
    assert torch.isfinite(total).all()
    assert gsm.skipped_samples == 3
    for i in range(x.shape[0]):
        keep = [j for j in range(x.shape[0]) if j != i]
        without_i, _ = _clipped_sum(x[keep], y[keep], policy, mode)
        contribution = (total - without_i).norm().item()
        assert contribution <= C * (1 + 1e-5), (i, contribution)
        if i in (1, 2, 3):
            assert contribution == pytest.approx(0.0, abs=1e-5)  # dropped, and counted above
        if i == 0 and isinstance(policy, FlatClipping):
            assert contribution == pytest.approx(C, rel=1e-3)  # huge but finite: clipped, not dropped


def test_clip_factors_never_exceed_the_bound():
    norms = torch.tensor([0.0, 1e-8, 0.5, 1.0, 2.0, 1e30, math.inf, math.nan])
    for policy in (FlatClipping(1.5), AutomaticClipping(1.5)):
        factors = policy.factors(norms)
        contribution = torch.nan_to_num(factors * norms, nan=0.0)
        assert (contribution <= 1.5).all() and torch.isfinite(factors).all() and (factors >= 0).all()
        assert factors[-2:].eq(0).all()


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, "1"])
def test_max_grad_norm_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        FlatClipping(value)


def test_per_layer_factors_bound_every_parameter():
    from fastdp.engine.clipping import PerLayerClipping

    norm_sq = {1: torch.tensor([0.0, 4.0, 1e30, math.inf, math.nan]), 2: torch.tensor([9.0, 0.25, 1.0, 1.0, 1.0])}
    policy = PerLayerClipping({1: 1.0, 2: 0.5})
    assert policy.max_grad_norm == pytest.approx(math.sqrt(1.25))
    factors = policy.factors_by_param(norm_sq, torch.zeros(5))
    for key, bound in policy.bounds.items():
        contribution = torch.nan_to_num(factors[key] * norm_sq[key].sqrt(), nan=0.0)
        assert (contribution <= bound * (1 + 1e-6)).all() and torch.isfinite(factors[key]).all()
    assert factors[1][3:].eq(0).all()
    with pytest.raises(ValueError, match="not in the optimizer"):
        policy.factors_by_param({3: torch.ones(2)}, torch.ones(2))
