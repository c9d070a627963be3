"""fastdp's CUDA extension (csrc/): fused LSTM/GRU cell kernels against the torch references.

On a GPU machine the first test loads the extension (prebuilt fastdp._C, else a JIT build with
ninja of about a minute; set TORCH_EXTENSIONS_DIR to keep the build between runs). Without CUDA
those tests skip; the CPU tests check that the loader then registers nothing and the layers run
the pure-torch path, even with FASTDP_BACKEND=cuda.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fastdp.ops import available_impls
from fastdp.ops.rnn_cells import gru_cell_pointwise, lstm_cell_pointwise

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and nvcc or a prebuilt fastdp._C)")


def test_without_gpu_nothing_is_registered_and_the_torch_path_runs(monkeypatch, caplog):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only behaviour")
    import fastdp.csrc  # noqa: F401
    import fastdp.layers.rnn as rnn_module
    from fastdp.layers import DPLSTM

    assert "cuda" not in available_impls("lstm_cell_pointwise")
    monkeypatch.setenv("FASTDP_BACKEND", "cuda")
    rnn_module._logged_backends.clear()
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4)
    layer = DPLSTM(3, 4)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3)
    with caplog.at_level(logging.INFO, logger="fastdp.layers.rnn"):
        torch.testing.assert_close(layer(x)[0], reference(x)[0], rtol=1e-5, atol=1e-6)
    assert "run the pure-torch path" in caplog.text


def test_implementations_fall_back_to_the_given_references_off_gpu(monkeypatch):
    """What fastdp.csrc hands to fastdp.ops: one implementation per cell op, each running the torch
    reference it was given for tensors the extension cannot take (CPU here)."""
    import fastdp.csrc as csrc

    references = {"lstm_cell_pointwise": lstm_cell_pointwise.torch_reference,
                  "gru_cell_pointwise": gru_cell_pointwise.torch_reference}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert csrc.implementations(references) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, but CPU tensors
    impls = csrc.implementations(references)
    assert set(impls) == set(references)
    gx, gh, c = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 2)
    assert impls["lstm_cell_pointwise"].resolve(gx) is references["lstm_cell_pointwise"]
    for got, expected in zip(impls["lstm_cell_pointwise"](gx, gh, c), references["lstm_cell_pointwise"](gx, gh, c)):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(impls["gru_cell_pointwise"](gx[:, :6], gh[:, :6], c),
                               references["gru_cell_pointwise"](gx[:, :6], gh[:, :6], c))


def test_ops_register_what_the_extension_hands_over(monkeypatch):
    import copy

    import fastdp.csrc as csrc
    from fastdp import ops

    monkeypatch.setattr(ops, "_IMPLS", copy.deepcopy(ops._IMPLS))
    monkeypatch.setattr(ops, "_kernels_loaded", False)
    handed = {}

    def implementations(references):
        handed.update(references)
        return {"gru_cell_pointwise": "the extension's kernel"}

    monkeypatch.setattr(csrc, "implementations", implementations)
    ops.load_kernels()
    assert handed["gru_cell_pointwise"] is gru_cell_pointwise.torch_reference  # every declared op's reference
    assert set(handed) == set(ops.declared_ops())
    assert ops._IMPLS["gru_cell_pointwise"]["cuda"] == "the extension's kernel"


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extension():
    import fastdp.csrc as csrc

    module = csrc.load_extension()
    assert module is not None, "the CUDA extension neither loaded nor JIT-built (see the fastdp.csrc log)"
    return csrc


def _step_inputs(batch, hidden, gates, dtype, seed=0):
    """gx as one time step of a [B, T, G·H] tensor (row-strided, like the layers pass it), gh, state."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    gx = torch.randn(batch, 3, gates * hidden, device="cuda", dtype=dtype, generator=gen)[:, 1]
    gh = torch.randn(batch, gates * hidden, device="cuda", dtype=dtype, generator=gen)
    state = torch.randn(batch, hidden, device="cuda", dtype=dtype, generator=gen)
    return [t.requires_grad_() for t in (gx, gh, state)]


def _compare(fused, reference, inputs, tol):
    fused_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out_fused, out_ref = fused(*fused_inputs), reference(*ref_inputs)
    out_fused = out_fused if isinstance(out_fused, tuple) else (out_fused,)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    weights = [torch.randn_like(o) for o in out_ref]
    for a, e in zip(out_fused, out_ref):
        torch.testing.assert_close(a, e, **tol)
    sum((a * w).sum() for a, w in zip(out_fused, weights)).backward()
    sum((e * w).sum() for e, w in zip(out_ref, weights)).backward()
    for a, e in zip(fused_inputs, ref_inputs):
        torch.testing.assert_close(a.grad, e.grad, **tol)


TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12},
              torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@needs_cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("batch,hidden", [(4, 8), (3, 129), (0, 5)])
def test_lstm_cell_kernel_matches_reference(extension, dtype, batch, hidden):
    reference = lstm_cell_pointwise.torch_reference
    if dtype == torch.bfloat16:  # the kernel computes in fp32: compare with the fp32 reference of bf16 inputs
        reference = lambda *xs: tuple(o.to(dtype) for o in lstm_cell_pointwise.torch_reference(*(x.float() for x in xs)))  # noqa: E731
    _compare(extension.LSTMCellFunction.apply, reference, _step_inputs(batch, hidden, 4, dtype), TOLERANCES[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("batch,hidden", [(4, 8), (3, 129), (0, 5)])
def test_gru_cell_kernel_matches_reference(extension, dtype, batch, hidden):
    reference = gru_cell_pointwise.torch_reference
    if dtype == torch.bfloat16:
        reference = lambda *xs: gru_cell_pointwise.torch_reference(*(x.float() for x in xs)).to(dtype)  # noqa: E731
    _compare(extension.GRUCellFunction.apply, reference, _step_inputs(batch, hidden, 3, dtype), TOLERANCES[dtype])


@needs_cuda
def test_kernels_are_dispatched_for_cuda_tensors(extension):
    from fastdp.ops.rnn_cells import cell_impl

    gx = torch.zeros(2, 8, device="cuda")
    assert cell_impl("lstm_cell_pointwise", gx) is extension.LSTMCellFunction.apply
    assert cell_impl("gru_cell_pointwise", gx[:, :6]) is extension.GRUCellFunction.apply
    assert cell_impl("lstm_cell_pointwise", gx.cpu()) is lstm_cell_pointwise.torch_reference


@needs_cuda
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dp_layers_on_gpu_match_torch_and_microbatching(extension, kind):
    """End to end on the GPU: the layer equals torch's, and per-sample norms equal microbatching."""
    from fastdp.engine.grad_sample_module import GradSampleModule
    from fastdp.layers import DPGRU, DPLSTM

    torch.manual_seed(0)
    reference = (nn.LSTM if kind == "lstm" else nn.GRU)(6, 16, num_layers=2, bidirectional=True, batch_first=True).cuda()
    layer = (DPLSTM if kind == "lstm" else DPGRU)(6, 16, num_layers=2, bidirectional=True, batch_first=True).cuda()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(5, 7, 6, device="cuda")
    torch.testing.assert_close(layer(x)[0], reference(x)[0], rtol=1e-4, atol=1e-5)  # cuDNN vs fused cells

    weights = torch.randn(5, 7, 32, device="cuda")
    expected = []
    for i in range(5):
        layer.zero_grad()
        (layer(x[i : i + 1])[0] * weights[i : i + 1]).sum().backward()
        expected.append(torch.sqrt(sum(p.grad.double().square().sum() for p in layer.parameters())))
    gsm = GradSampleModule(layer, loss_reduction="sum")
    (gsm(x)[0] * weights).sum().backward()
    torch.testing.assert_close(gsm.per_sample_norms.double(), torch.stack(expected), rtol=1e-4, atol=1e-6)
