"""pytest-benchmark timings of the fastdp per-sample ops, per backend, at a couple of shapes.

    python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-columns=median,iqr,ops]

Runs on CUDA when available (every registered backend of each op: torch, triton, cuda),
else on CPU with the torch references at smaller shapes. Each timed call ends with
torch.cuda.synchronize() on CUDA so the kernel's time is counted, not its launch. This
file lives outside tests/, so ``python -m pytest tests`` never collects it.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdp  # noqa: F401  (defines every op)
from fastdp import ops
from fastdp.ops import conv, embedding, linear, noise, norms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"


def _backends(op_name: str):
    """The backends of an op worth timing here: all registered ones on CUDA, the torch reference on CPU."""
    if not ON_CUDA:
        return ["torch"]
    return [backend for backend in ops.BACKENDS if backend in ops.available_impls(op_name)]


def _cases(op_name: str, shapes: dict):
    return [pytest.param(backend, shape, id=f"{backend}-{label}") for backend in _backends(op_name)
            for label, shape in shapes.items()]


def _timed(benchmark, monkeypatch, backend, fn, *args):
    """Benchmark ``fn(*args)`` with FASTDP_BACKEND=backend (read by the dispatcher at each call)."""
    monkeypatch.setenv("FASTDP_BACKEND", backend)

    def call():
        out = fn(*args)
        if ON_CUDA:
            torch.cuda.synchronize()
        return out

    call()  # compile / autotune outside the timing
    return benchmark(call)


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


# (B, T, d, p): a GPT-2-small projection and an MLP layer (T = 1); scaled down on CPU
LINEAR_SHAPES = (
    {"gpt2-attn-16x256x768x768": (16, 256, 768, 768), "mlp-512x1x1024x1024": (512, 1, 1024, 1024)}
    if ON_CUDA else {"seq-8x64x128x128": (8, 64, 128, 128), "mlp-64x1x256x256": (64, 1, 256, 256)}
)


@pytest.mark.parametrize("backend,shape", _cases("linear_norm_sq_ghost", LINEAR_SHAPES))
def test_linear_norm_sq_ghost(benchmark, monkeypatch, backend, shape):
    B, T, d, p = shape
    out = _timed(benchmark, monkeypatch, backend, linear.linear_norm_sq_ghost, _randn(B, T, d), _randn(B, T, p))
    assert out.shape == (B,)


@pytest.mark.parametrize("backend,shape", _cases("linear_norm_sq_direct", LINEAR_SHAPES))
def test_linear_norm_sq_direct(benchmark, monkeypatch, backend, shape):
    B, T, d, p = shape
    out = _timed(benchmark, monkeypatch, backend, linear.linear_norm_sq_direct, _randn(B, T, d), _randn(B, T, p))
    assert out.shape == (B,)


@pytest.mark.parametrize("backend,shape", _cases("linear_clipped_grad", LINEAR_SHAPES))
def test_linear_clipped_grad(benchmark, monkeypatch, backend, shape):
    B, T, d, p = shape
    c = torch.rand(B, device=DEVICE)
    out = _timed(benchmark, monkeypatch, backend, linear.linear_clipped_grad, _randn(B, T, d), _randn(B, T, p), c)
    assert out.shape == (p, d)


# (B, C_in, C_out, H=W of the output), 3×3 kernel, stride 1, input already padded
CONV_SHAPES = (
    {"resnet-stage1-256x64x64x32": (256, 64, 64, 32), "resnet-stage4-256x512x512x4": (256, 512, 512, 4)}
    if ON_CUDA else {"8x16x16x16": (8, 16, 16, 16), "8x64x64x4": (8, 64, 64, 4)}
)


def _conv_args(shape):
    B, c_in, c_out, size = shape
    return _randn(B, c_in, size + 2, size + 2), _randn(B, c_out, size, size)


@pytest.mark.parametrize("backend,shape", _cases("conv_weight_norm_sq", CONV_SHAPES))
def test_conv_weight_norm_sq(benchmark, monkeypatch, backend, shape):
    x, g = _conv_args(shape)
    out = _timed(benchmark, monkeypatch, backend, conv.conv_weight_norm_sq, x, g, (3, 3), (1, 1), (1, 1), 1)
    assert out.shape == (shape[0],)


@pytest.mark.parametrize("backend,shape", _cases("conv_weight_clipped_grad", CONV_SHAPES))
def test_conv_weight_clipped_grad(benchmark, monkeypatch, backend, shape):
    x, g = _conv_args(shape)
    c = torch.rand(shape[0], device=DEVICE)
    out = _timed(benchmark, monkeypatch, backend, conv.conv_weight_clipped_grad, x, g, c, (3, 3), (1, 1), (1, 1), 1)
    assert out.shape == (shape[2], shape[1], 3, 3)


# (B, tokens per sample, vocab, dim): nn.Embedding at the EmbeddingBag classifier's shape (the bag itself
# takes the rank-one ops of fastdp.ops.embedding_bag) and GPT-2's token embedding
EMBEDDING_SHAPES = (
    {"bag-256x50-50000x64": (256, 50, 50000, 64), "gpt2-16x256-50257x768": (16, 256, 50257, 768)}
    if ON_CUDA else {"32x16-1000x64": (32, 16, 1000, 64), "4x64-5000x128": (4, 64, 5000, 128)}
)


def _token_list(shape):
    B, length, vocab, dim = shape
    ids = torch.randint(0, vocab, (B * length,), device=DEVICE)
    sample_of_token = torch.arange(B, device=DEVICE).repeat_interleave(length)
    return ids, sample_of_token, _randn(B * length, dim)


@pytest.mark.parametrize("backend,shape", _cases("embedding_norm_sq", EMBEDDING_SHAPES))
def test_embedding_norm_sq(benchmark, monkeypatch, backend, shape):
    B, _, vocab, _ = shape
    out = _timed(benchmark, monkeypatch, backend, embedding.embedding_norm_sq, *_token_list(shape), B, vocab, -1)
    assert out.shape == (B,)


@pytest.mark.parametrize("backend,shape", _cases("embedding_clipped_grad", EMBEDDING_SHAPES))
def test_embedding_clipped_grad(benchmark, monkeypatch, backend, shape):
    B, _, vocab, dim = shape
    c = torch.rand(B, device=DEVICE)
    out = _timed(benchmark, monkeypatch, backend, embedding.embedding_clipped_grad, *_token_list(shape), c, vocab, -1)
    assert out.shape == (vocab, dim)


# view [B, M, C, S] with num_groups: LayerNorm over GPT-2 tokens, GroupNorm over a ResNet stage
NORM_SHAPES = (
    {"layernorm-16x256x768": ((16, 256, 768, 1), 1), "groupnorm-256x64x32x32": ((256, 1, 64, 1024), 32)}
    if ON_CUDA else {"layernorm-4x32x64": ((4, 32, 64, 1), 1), "groupnorm-8x16x16x16": ((8, 1, 16, 256), 8)}
)


@pytest.mark.parametrize("backend,shape", _cases("norm_weight_grad_sample", NORM_SHAPES))
def test_norm_weight_grad_sample(benchmark, monkeypatch, backend, shape):
    view, groups = shape
    out = _timed(benchmark, monkeypatch, backend, norms.norm_weight_grad_sample, _randn(*view), _randn(*view), groups, 1e-5, False)
    assert out.shape == (view[0], view[2])


# flat gradient buffers: GPT-2-small (124M) and ResNet18 (11M) parameters
NOISE_SIZES = {"124M": 124_000_000, "11M": 11_200_000} if ON_CUDA else {"1M": 1_000_000}


@pytest.mark.parametrize("backend,numel", _cases("add_noise_and_scale", NOISE_SIZES))
def test_add_noise_and_scale(benchmark, monkeypatch, backend, numel):
    flat = torch.zeros(numel, device=DEVICE)
    _timed(benchmark, monkeypatch, backend, noise.add_noise_and_scale, flat, 1.0, 1 / 256)
    assert math.isfinite(float(flat[:1000].sum()))
