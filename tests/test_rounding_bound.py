"""No sample contributes more than C to the clipped sum *as computed*, also in bf16/fp16.

The clipped sums are formed without materialising per-sample gradients, from rounded products
c·g_t. When a sample's terms g_t ⊗ a_t cancel, their rounding errors need not, and the
computed contribution could exceed C by far (the first test builds such a sample: without the
engine's rounding slack it contributes ~1.8·C in bf16). ``fastdp.ops.rounding`` bounds the
error and the engine clips with ‖G_i‖ + slack. Allowed above C: the final rounding of the sum to
the parameter's dtype (one unit roundoff), which is not per-sample.
"""

import pytest
import torch
from torch import nn

from fastdp.ops import rounding
from fastdp.engine.clipping import FlatClipping
from fastdp.engine.grad_sample_module import GradSampleModule
from fastdp.engine.rules.linear import LinearRule
from fastdp.layers import DPLSTM

from .rule_testing import without_rounding_bounds

C = 1.0
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _cancelling_sample(dtype, ratio, p=8, d=4):
    """One sample of two positions whose terms nearly cancel: g = (x, -y) with y one step of
    ``dtype`` below x = 1, a = (v, v); ‖G‖ = ratio · C."""
    x = torch.ones(p, dtype=dtype)
    y = torch.full((p,), 1.0, dtype=dtype) - torch.finfo(dtype).eps / 2
    v = torch.ones(d) / d**0.5 * (ratio * C / float((x.float() - y.float()).norm()))
    return torch.stack([x, -y])[None], torch.stack([v, v])[None].to(dtype)


def _contribution(module, inputs, grad_output) -> float:
    """‖p.grad‖ of a batch of one sample, clipped to C (the loss's output gradient is ``grad_output``)."""
    gsm = GradSampleModule(module, loss_reduction="sum", clipping=FlatClipping(C))
    (gsm(inputs) * grad_output).sum().backward()
    grads = [p.grad.double().flatten() for p in module.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def _allowed(dtype) -> float:
    return C * (1 + rounding.UNIT_ROUNDOFF[dtype])


RATIOS = [1.1, 1.5, 2.2, 3.0, 3.7, 5.3, 7.1, 9.9]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_a_linear_sample_whose_terms_cancel_contributes_at_most_c(dtype, monkeypatch):
    def worst():
        results = []
        for ratio in RATIOS:
            g, a = _cancelling_sample(dtype, ratio)
            results.append(_contribution(nn.Linear(a.shape[-1], g.shape[-1], bias=False).to(dtype), a, g))
        return max(results)

    assert worst() <= _allowed(dtype)
    without_rounding_bounds(monkeypatch)
    assert worst() > 1.1 * C  # without the bounds: the failure they guard against


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_a_conv_sample_whose_terms_cancel_contributes_at_most_c(dtype, monkeypatch):
    """The same sample through a 1×1 Conv1d over two positions (channels first)."""
    def worst():
        results = []
        for ratio in RATIOS:
            g, a = _cancelling_sample(dtype, ratio)
            conv = nn.Conv1d(a.shape[-1], g.shape[-1], 1).to(dtype)
            results.append(_contribution(conv, a.mT.contiguous(), g.mT.contiguous()))
        return max(results)

    assert worst() <= _allowed(dtype)
    without_rounding_bounds(monkeypatch)
    assert worst() > 1.1 * C


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_random_samples_of_every_rounding_rule_contribute_at_most_c(dtype, seed):
    """Linear (3-D input), Conv2d with groups and stride, and DPLSTM, one large-gradient sample each."""
    torch.manual_seed(seed)
    lstm = DPLSTM(4, 6, batch_first=True)
    cases = [
        (nn.Linear(5, 7), torch.randn(1, 9, 5) * 30),
        (nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=1), torch.randn(1, 4, 7, 7) * 30),
        (lstm, torch.randn(1, 8, 4) * 30),
    ]
    for module, x in cases:
        module = module.to(dtype)
        x = x.to(dtype)
        out = GradSampleModule(module, loss_reduction="sum", clipping=FlatClipping(C))(x)
        out = out[0] if isinstance(out, tuple) else out
        (out.float() * torch.randn(out.shape) * 100).sum().backward()
        total = torch.cat([p.grad.double().flatten() for p in module.parameters() if p.grad is not None]).norm()
        assert float(total) <= _allowed(dtype), type(module).__name__


def test_product_error_by_format_and_precision_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rounding.product_error(torch.bfloat16, cpu) == pytest.approx((1 + 2**-8) ** 2 - 1)
    assert rounding.product_error(torch.float16, cpu) == pytest.approx((1 + 2**-11) ** 2 - 1)
    assert rounding.product_error(torch.float64, cpu) == 0
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert rounding.product_error(torch.float32, cpu, kind="conv") == 0
    assert rounding.product_error(torch.float32, cuda, kind="conv") == pytest.approx((1 + 2**-11) ** 2 - 1)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert rounding.product_error(torch.float32, cpu) == 0
        torch.set_float32_matmul_precision("high")
        assert rounding.product_error(torch.float32, cpu) == pytest.approx((1 + 2**-11) ** 2 - 1)
        torch.set_float32_matmul_precision("medium")
        assert rounding.product_error(torch.float32, cpu) == pytest.approx((1 + 2**-8) ** 2 - 1)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_slack_bounds_the_actual_rounding_error_of_the_clipped_gemm():
    """For random bf16 shapes: ‖computed (c ⊙ g)ᵀ a − c Gᵀ‖ ≤ c · slack, sample by sample."""
    from fastdp.ops import linear as linear_ops

    torch.manual_seed(0)
    for _ in range(20):
        B, T, d, p = torch.randint(1, 6, (4,)).tolist()
        a = torch.randn(B, T, d).to(torch.bfloat16)
        g = torch.randn(B, T, p).to(torch.bfloat16)
        c = torch.rand(B)
        slack = rounding.sequence_slack(a, g, rounding.clipped_sum_error(torch.bfloat16, a.device, T, B * T))
        for i in range(B):
            only_i = torch.zeros(B)
            only_i[i] = c[i]
            computed = linear_ops.linear_clipped_grad.torch_reference(a, g, only_i).double()
            exact = c[i].double() * (g[i].double().T @ a[i].double())
            # the GEMM's own output rounding to bf16 is the sum's rounding, allowed on top
            allowance = rounding.UNIT_ROUNDOFF[torch.bfloat16] * float(computed.norm())
            assert float((computed - exact).norm()) <= float(c[i]) * float(slack[i]) + allowance + 1e-12


def test_norms_are_computed_without_tf32(monkeypatch):
    """A norm rounded to TF32 could come out too small (and its clip factor too large); the slack, in turn,
    is set for the TF32 setting the clipped sum runs under."""
    seen = []
    original = rounding.chunked_bmm

    def recording(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return original(*args, **kwargs)

    monkeypatch.setattr(rounding, "chunked_bmm", recording)
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        module = nn.Linear(16, 16)  # T = 2 positions: the ghost norm
        gsm = GradSampleModule(module, loss_reduction="sum", clipping=FlatClipping(C))
        gsm(torch.randn(4, 2, 16)).sum().backward()
        assert seen == [("highest", False)] * 2  # the two Grams of the ghost norm
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("high", True)  # restored
        inputs, grad_output = (torch.randn(4, 2, 16),), torch.randn(4, 2, 16)
        slack_tf32 = LinearRule().norm_bounds(module, inputs, grad_output)[1]["weight"]
        torch.set_float32_matmul_precision("highest")
        slack_ieee = LinearRule().norm_bounds(module, inputs, grad_output)[1]["weight"]
        assert (slack_tf32 > 100 * slack_ieee).all()  # the GEMM's TF32 operands are in the slack
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]
