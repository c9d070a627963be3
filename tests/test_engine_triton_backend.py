"""The whole engine through the Triton kernels (FASTDP_BACKEND=triton) equals the torch backend.

On CPU the kernels run in triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
a GPU the models, batches and noise run on it and the kernels are compiled (the GPU session,
bench/gpu_session.sh, runs this file there).
Each model's clipped step must also match the microbatch reference, and the ops the step
called must actually have run their Triton implementations (no silent torch fallback, except
conv's clipped gradient, which is cuDNN's weight gradient by design).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fastdp import GradSampleModule, ops  # noqa: E402
from fastdp.engine.clipping import FlatClipping  # noqa: E402
from fastdp.optimizers import DPOptimizer  # noqa: E402

from .models import clipped_sum, make, microbatch_per_sample_grads  # noqa: E402
from .rule_testing import BOUND_RTOL, assert_rel_close  # noqa: E402

TORCH_BY_DESIGN = {"conv_weight_clipped_grad"}
#: where the engine runs: CUDA tensors reach the compiled kernels, CPU tensors the interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def record_backends(monkeypatch):
    """Which backend each op ran on during the test: {op name: set of backends}."""
    ops.load_kernels()
    seen = {}
    original = ops.select_impl

    def select(name, *args):
        impl = original(name, *args)
        backend = next(b for b, fn in ops.available_impls(name).items() if fn is impl)
        seen.setdefault(name, set()).add(backend)
        return impl

    monkeypatch.setattr(ops, "select_impl", select)
    return seen


def _clipped_step(name, backend, monkeypatch, batch=3):
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    model, make_input, classes = make(name)
    model.to(DEVICE)
    torch.manual_seed(1)
    x, y = make_input(batch).to(DEVICE), torch.randint(0, classes, (batch,)).to(DEVICE)
    expected = clipped_sum(microbatch_per_sample_grads(model, x, y), 1.0)
    gsm = GradSampleModule(model, loss_reduction="sum", clipping=FlatClipping(1.0))
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gsm.to_standard_module()
    return grads, expected


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "sequence", "tied", "bag"])
def test_triton_engine_step_equals_torch_and_microbatching(name, monkeypatch, record_backends):
    torch_grads, expected = _clipped_step(name, "torch", monkeypatch)
    record_backends.clear()
    triton_grads, _ = _clipped_step(name, "triton", monkeypatch)
    flat = lambda grads: torch.cat([grads[param].flatten() for param in expected])  # noqa: E731
    # Compared over the whole gradient: a conv bias before GroupNorm has a gradient that is zero
    # up to rounding, which no per-parameter relative test can pin down.
    assert_rel_close(flat(torch_grads), flat(expected), 1e-5)
    # both clip with upper bounds of the norms, the kernels' (tf32x3 on a GPU) a little looser
    assert_rel_close(flat(triton_grads), flat(torch_grads), BOUND_RTOL)
    assert record_backends, "the step called no dispatched op"
    fell_back = {op for op, backends in record_backends.items() if "triton" not in backends} - TORCH_BY_DESIGN
    assert not fell_back, f"ops that ran their torch reference under FASTDP_BACKEND=triton: {sorted(fell_back)}"


def test_triton_noise_pass_in_the_optimizer(monkeypatch, record_backends):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    model = torch.nn.Linear(40, 30).to(DEVICE)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=2.0, max_grad_norm=0.5,
                            expected_batch_size=4, generator=torch.Generator(DEVICE).manual_seed(3))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert record_backends["add_noise_and_scale"] == {"triton"}
    # 1230 draws of N(0, (2 · 0.5 / 4)²): the sample std is within 10% with overwhelming probability
    assert abs(float(noise.std()) / 0.25 - 1) < 0.1


def test_forced_only_kernel_is_skipped_by_automatic_dispatch(monkeypatch):
    """A kernel registered with automatic=False runs only when FASTDP_BACKEND names its backend."""
    monkeypatch.delenv("FASTDP_BACKEND", raising=False)
    ops.load_kernels()
    impls = ops.available_impls("linear_clipped_grad")

    class FakeCuda(torch.Tensor):  # select_impl reads only .is_cuda
        @property
        def is_cuda(self):
            return True

    a = torch.zeros(1, 1, 1).as_subclass(FakeCuda)
    assert ops.select_impl("linear_clipped_grad", a) is impls["torch"]
    assert ops.select_impl("linear_norm_sq_direct", a) is ops.available_impls("linear_norm_sq_direct")["triton"]
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    assert ops.select_impl("linear_clipped_grad", a) is impls["triton"]
